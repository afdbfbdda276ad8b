"""Captions from an OpenAI-compatible chat-completions server (vLLM's, typically).

Each image or video is sent as one request with the same content as the local path: a user message
holding the image (``image_url`` with a ``data:image/png;base64,...`` URL of the decoded RGB pixels,
PNG so nothing is lost) or the video, followed by the prompt text. A video goes as the frames the
local path samples, not as the file: vLLM's frame-list form ``video_url`` =
``data:video/jpeg;base64,<frame 1>,<frame 2>,...`` with the sampling facts (native fps, total frame
count, the sampled frame indices; ``do_sample_frames: false``) in the request's ``media_io_kwargs``,
so the server neither decodes nor resamples and its temporal positions (Qwen2.5-VL's seconds per
temporal patch) come from the same numbers. vLLM opens each frame with PIL, which reads the format
from the bytes, so the frames are PNG despite the media-type name: the served model sees the local
model's pixels exactly. vLLM takes per-request ``media_io_kwargs`` only from a server started with
``--trust-request-mm-kwargs`` (``vlm serve MODEL --vllm-args '--trust-request-mm-kwargs'``); without
it a video item fails with an error that names its record and says so; greedy decoding via ``temperature: 0`` and
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
    """The endpoint could not be reached or answered something that is not a chat completion.
    ``status``: the HTTP status when the server answered with an error (a refused request)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


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


def video_frames_data_url(frames) -> str:
    """``data:video/jpeg;base64,<png>,<png>,...``: vLLM's frame-list form (see the module docstring)."""
    from PIL import Image

    parts = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        parts.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return "data:video/jpeg;base64," + ",".join(parts)


def video_media_io_kwargs(metadata: dict) -> dict:
    """vLLM's per-request video options for frames already sampled (:func:`read_video`'s metadata)."""
    return {"num_frames": -1, "fps": float(metadata["fps"]), "total_num_frames": int(metadata["total_num_frames"]),
            "frames_indices": [int(i) for i in metadata["frames_indices"]],
            "duration": float(metadata["duration"]), "do_sample_frames": False}


def template_omits_bos(processor) -> bool:
    """Whether transformers (and our training and local eval: the one-BOS rule, ``adds_bos``) puts
    a BOS before this processor's rendered chat prompt that its chat template does not write
    (LLaVA-1.5). vLLM's chat API adds no special tokens by default, so such a model served by it
    reads no BOS unless the request sets ``add_special_tokens``."""
    from vlm.data_formats.chat_render import adds_bos
    from vlm.export.verify import probe_messages

    rendered = processor.apply_chat_template(probe_messages(), add_generation_prompt=True)
    return processor.tokenizer.bos_token is not None and adds_bos(processor.tokenizer, rendered)


def build_request(served_model: str, item, prompt: str, settings: GenerationSettings,
                  add_special_tokens: bool = False) -> dict:
    """The JSON body of one chat-completions request for an eval item (``.image`` or ``.video``;
    a bare PIL image is taken as an image item). ``add_special_tokens``: vLLM's request field that
    makes the server add the tokenizer's BOS (:func:`template_omits_bos`)."""
    video = getattr(item, "video", None)
    image = item.image if hasattr(item, "image") else item
    if video is not None:
        frames, metadata = video
        media = {"type": "video_url", "video_url": {"url": video_frames_data_url(frames)}}
    else:
        media = {"type": "image_url", "image_url": {"url": image_data_url(image)}}
    body = {
        "model": served_model,
        "messages": [{"role": "user", "content": [media, {"type": "text", "text": prompt}]}],
        "temperature": 0,
        "max_tokens": settings.max_new_tokens,
    }
    if video is not None:
        body["media_io_kwargs"] = {"video": video_media_io_kwargs(metadata)}
    if settings.min_new_tokens:
        body["min_tokens"] = settings.min_new_tokens
    if add_special_tokens:
        body["add_special_tokens"] = True
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
                 concurrency: int = 1, add_special_tokens: bool = False):
        if not served_model:
            raise EndpointError("--served-model is required with --endpoint: the name the server serves "
                                "the model (or LoRA adapter) under, as listed by GET /v1/models")
        self.url = chat_completions_url(url)
        self.served_model = served_model
        self.timeout = timeout
        self.api_key = api_key
        self.concurrency = max(1, int(concurrency))
        self.add_special_tokens = add_special_tokens   # ask the server for the BOS its template omits

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
                                f"(is {self.served_model!r} the served model name?)", status=e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EndpointError(f"cannot reach the endpoint {self.url}: {reason}. Is the server running "
                                "(e.g. `vlm serve ...`) and is the URL right?") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise EndpointError(f"endpoint {self.url} did not answer JSON: {raw[:200]!r}") from None

    def caption(self, item, prompt: str, settings: GenerationSettings) -> tuple[str, int | None]:
        """``item``: an eval item (image or video) or a PIL image."""
        return parse_response(self._post(build_request(self.served_model, item, prompt, settings,
                                                       add_special_tokens=self.add_special_tokens)))

    def generate(self, items: Sequence, settings: GenerationSettings) -> GenerationResult:
        def one(it):
            try:
                return self.caption(it, prompt_for(it, settings), settings)
            except EndpointError as e:   # say which record the server refused (e.g. a video)
                where = getattr(it, "where", None)
                if not where or e.status is None:   # unreachable / not JSON: not about this record
                    raise
                hint = ""
                if it.media == "video" and "media_io_kwargs" in str(e):
                    hint = (" — the server refuses the frames' timing (per-request media_io_kwargs), which "
                            "vLLM accepts only when started with --trust-request-mm-kwargs: "
                            "`vlm serve MODEL --vllm-args '--trust-request-mm-kwargs'` (for trusted clients)")
                raise EndpointError(f"{where['file']}, record {where['index']} ({it.media}): {e}{hint}",
                                    status=e.status) from None

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
