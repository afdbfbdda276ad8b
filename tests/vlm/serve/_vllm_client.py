"""What both real-vLLM test modules share: the vLLM check and an OpenAI-client greedy request."""

from __future__ import annotations

import base64
import io
import json

import pytest

N = 12  # tokens compared per request


def require_vllm() -> None:
    pytest.importorskip("openai")
    from vlm.serve.plan import vllm_flavour

    if vllm_flavour() is None:
        pytest.fail("vLLM is not installed in this environment: run `make test-serve` (it runs `make serve-deps`)")


def image_url() -> str:
    from vlm.export.verify import probe_image

    buf = io.BytesIO()
    probe_image().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def served_tokens(url: str, model: str, api_key: str = "none", *, add_bos: bool = False) -> list[int]:
    """Greedy tokens of the probe chat request. ``add_bos``: ask vLLM to tokenize the rendered prompt
    with the tokenizer's special tokens (its chat API adds none by default), for a checkpoint whose
    template writes no BOS while transformers' ``apply_chat_template(tokenize=True)`` adds one."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key, timeout=300)
    r = client.chat.completions.create(
        model=model, temperature=0, max_tokens=N,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                                {"type": "text", "text": "Describe the image."}]}],
        extra_body={"min_tokens": N, "return_token_ids": True, "skip_special_tokens": False,
                    **({"add_special_tokens": True} if add_bos else {})})
    return list(r.choices[0].token_ids)


def video_eval_file(folder):
    """A Qwen2-VL-Finetune `video` record (a 3-second mp4, 6 frames sampled at 2 fps) and an image record."""
    from tests.data_formats.test_video import write_clip
    from vlm.export.verify import probe_image

    folder.mkdir(parents=True, exist_ok=True)
    write_clip(folder / "clip.mp4")
    probe_image().save(folder / "probe.png")
    records = [{"id": "clip", "video": "clip.mp4", "conversations": [
                   {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "a bar grows"}]},
               {"id": "probe", "image": "probe.png", "conversations": [
                   {"from": "human", "value": "<image>\nDescribe the image."},
                   {"from": "gpt", "value": "a bright gradient with noise"}]}]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "eval.jsonl"
