"""What both real-vLLM test modules share: the vLLM check and an OpenAI-client greedy request."""

from __future__ import annotations

import base64
import io

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


def served_tokens(url: str, model: str, api_key: str = "none") -> list[int]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key, timeout=300)
    r = client.chat.completions.create(
        model=model, temperature=0, max_tokens=N,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                                {"type": "text", "text": "Describe the image."}]}],
        extra_body={"min_tokens": N, "return_token_ids": True, "skip_special_tokens": False})
    return list(r.choices[0].token_ids)
