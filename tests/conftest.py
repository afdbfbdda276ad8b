"""Test setup shared by every package's tests.

- One torch thread: on 2 shared cores torch with 2 threads ran 10-200x slower (ENVIRONMENT.md).
- Triton runs under its interpreter on CPU machines (TRITON_INTERPRET=1) unless CUDA is present.
- Offline: nothing may reach a hub.
- No dynamic-plan cache (vlm.quant.plan_cache): every test that loads a ``dynamic`` policy runs the
  analysis it tests; tests/vlm/quant/test_plan_cache.py turns the cache on in a folder of its own.
- ``tiny_checkpoint(variant)``: a zoo checkpoint built once per session (vlm.zoo.build_tiny).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLM_QUANT_PLAN_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)

from vlm.zoo import VARIANTS  # noqa: E402

ZOO_VARIANTS = tuple(VARIANTS)  # every test that runs each family follows the zoo's registry


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: ``tiny_checkpoint("qwen2_vl")`` -> Path of a tiny checkpoint (built once per session)."""
    cache: dict[str, object] = {}
    root = tmp_path_factory.mktemp("zoo")

    def build(variant: str, seed: int = 0):
        key = f"{variant}-{seed}"
        if key not in cache:
            from vlm.zoo import build_tiny

            cache[key] = build_tiny(variant, root / key, seed=seed)
        return cache[key]

    return build


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
