"""Captions from an OpenAI-compatible chat-completions server (vLLM's, typically).

Each image is sent as one request with the same content as the local path: a user message holding
the image (``image_url`` with a ``data:image/png;base64,...`` URL of the decoded RGB pixels, PNG so
nothing is lost) followed by the prompt text; greedy decoding via ``temperature: 0`` and
``max_tokens``; ``min_tokens`` (a vLLM extension) only when asked for. The server applies the model's
own chat template, as the local path does.

``tokens_per_s`` = Σ usage.completion_tokens / wall seconds of all requests (sequential unless
``concurrency > 1``); memory is not observable through the API and is reported as None.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from vlm.errors import VlmError
from vlm.eval.generation import GenerationResult, GenerationSettings, prompt_for


class EndpointError(VlmError):
    """The endpoint could not be reached or answered something that is not a chat completion."""


def chat_completions_url(url: str) -> str:
    """``http://host:8000`` / ``.../v1`` / ``.../v1/chat/completions`` → the chat-completions URL."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if not u.endswith("/v1"):
        u += "/v1"
    return u + "/chat/completions"


def image_data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_request(served_model: str, image, prompt: str, settings: GenerationSettings) -> dict:
    """The JSON body of one chat-completions request."""
    body = {
        "model": served_model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            {"type": "text", "text": prompt},
        ]}],
        "temperature": 0,
        "max_tokens": settings.max_new_tokens,
    }
    if settings.min_new_tokens:
        body["min_tokens"] = settings.min_new_tokens
    return body


def parse_response(data: dict) -> tuple[str, int | None]:
    """``(caption, completion_tokens)`` from a chat-completions response body."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"the endpoint's answer is not a chat completion: {json.dumps(data)[:300]}") from None
    usage = data.get("usage") or {}
    return (content or "").strip(), usage.get("completion_tokens")


class EndpointClient:
    """``EndpointClient(url, served_model).generate(items, settings) -> GenerationResult``."""

    def __init__(self, url: str, served_model: str, *, timeout: float = 120.0, api_key: str | None = None,
                 concurrency: int = 1):
        if not served_model:
            raise EndpointError("--served-model is required with --endpoint: the name the server serves "
                                "the model (or LoRA adapter) under, as listed by GET /v1/models")
        self.url = chat_completions_url(url)
        self.served_model = served_model
        self.timeout = timeout
        self.api_key = api_key
        self.concurrency = max(1, int(concurrency))

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise EndpointError(f"endpoint {self.url} answered HTTP {e.code}: {detail or e.reason} "
                                f"(is {self.served_model!r} the served model name?)") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EndpointError(f"cannot reach the endpoint {self.url}: {reason}. Is the server running "
                                "(e.g. `vlm serve ...`) and is the URL right?") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise EndpointError(f"endpoint {self.url} did not answer JSON: {raw[:200]!r}") from None

    def caption(self, image, prompt: str, settings: GenerationSettings) -> tuple[str, int | None]:
        return parse_response(self._post(build_request(self.served_model, image, prompt, settings)))

    def generate(self, items: Sequence, settings: GenerationSettings) -> GenerationResult:
        def one(it):
            return self.caption(it.image, prompt_for(it, settings), settings)

        t0 = time.perf_counter()
        if self.concurrency == 1:
            answers = [one(it) for it in items]
        else:
            with ThreadPoolExecutor(self.concurrency) as pool:
                answers = list(pool.map(one, items))
        seconds = time.perf_counter() - t0
        counts = [n if n is not None else 0 for _, n in answers]
        result = GenerationResult([c for c, _ in answers], counts, seconds, None, None, "n/a",
                                  extra={"endpoint": self.url, "served_model": self.served_model})
        if any(n is None for _, n in answers):
            result.extra["notice"] = "the endpoint returned no usage.completion_tokens: tokens/s undercounts"
        return result
