"""Protocol test of the endpoint client against a stub HTTP server written here.

The stub only checks how requests are formed and answers are parsed (OpenAI chat-completions
schema); it is not a model server. The test against a real vLLM server belongs to the serving issue.
"""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from vlm.eval.data import read_eval_items
from vlm.eval.endpoint import EndpointClient, EndpointError, chat_completions_url
from vlm.eval.generation import GenerationSettings

from ._helpers import write_eval_file


class _Stub(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.path, body))
        if body["model"] != "served-name":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": "model not found"}')
            return
        text = body["messages"][0]["content"][1]["text"]
        answer = {"choices": [{"message": {"role": "assistant", "content": f" echo {len(type(self).received)}: {text} "}}],
                  "usage": {"completion_tokens": 3}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    _Stub.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_request_formation_and_parsing(stub, tmp_path):
    items = read_eval_items(write_eval_file(tmp_path))
    settings = GenerationSettings(max_new_tokens=7, min_new_tokens=2, prompt="What is shown?")
    result = EndpointClient(stub + "/v1", "served-name").generate(items, settings)
    assert result.captions == [f"echo {i + 1}: What is shown?" for i in range(len(items))]
    assert result.num_tokens == [3] * len(items) and result.model_bytes is None
    assert len(_Stub.received) == len(items)
    for (path, body), item in zip(_Stub.received, items):
        assert path == "/v1/chat/completions"
        assert body["temperature"] == 0 and body["max_tokens"] == 7 and body["min_tokens"] == 2
        image_part, text_part = body["messages"][0]["content"]
        assert text_part == {"type": "text", "text": "What is shown?"}
        head, payload = image_part["image_url"]["url"].split(",", 1)
        assert head == "data:image/png;base64"
        sent = Image.open(io.BytesIO(base64.b64decode(payload)))
        assert np.array_equal(np.asarray(sent.convert("RGB")), np.asarray(item.image))   # lossless


def test_http_error_is_reported(stub, tmp_path):
    items = read_eval_items(write_eval_file(tmp_path))
    with pytest.raises(EndpointError, match="HTTP 404.*model not found"):
        EndpointClient(stub, "wrong-name").generate(items[:1], GenerationSettings())


def test_url_forms():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_video_request_sends_the_sampled_frames_losslessly(stub, tmp_path):
    """A video item goes as vLLM's frame list: exactly the frames sampled locally (PNG, lossless), with
    the sampling facts in media_io_kwargs so the server does not resample (the real server: the
    serve-marked test_serve_vllm.py::test_served_video_matches_transformers)."""
    from .test_video_eval import write_video_eval

    items = [it for it in read_eval_items(write_video_eval(tmp_path)) if it.media == "video"]
    result = EndpointClient(stub, "served-name").generate(items, GenerationSettings(max_new_tokens=3))
    assert len(result.captions) == 3
    for (_, body), item in zip(_Stub.received, items):
        video_part, text_part = body["messages"][0]["content"]
        assert video_part["type"] == "video_url" and text_part["text"] == item.prompt
        head, payload = video_part["video_url"]["url"].split(",", 1)
        assert head == "data:video/jpeg;base64"
        sent = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB"))
                         for p in payload.split(",")])
        frames, meta = item.video
        assert np.array_equal(sent, frames)
        kw = body["media_io_kwargs"]["video"]
        assert kw["frames_indices"] == meta["frames_indices"] and kw["do_sample_frames"] is False
        assert (kw["fps"], kw["total_num_frames"], kw["num_frames"]) == (meta["fps"], meta["total_num_frames"], -1)


def test_refused_item_is_named(stub, tmp_path):
    """An error answer names the record the request was for."""
    data = write_eval_file(tmp_path)
    items = read_eval_items(data)
    with pytest.raises(EndpointError, match=rf"^{data}, record 0 \(image\): endpoint .* HTTP 404"):
        EndpointClient(stub, "wrong-name").generate(items[:1], GenerationSettings())


def _zoo_variants():
    from vlm.zoo import VARIANTS

    return sorted(VARIANTS)


@pytest.mark.parametrize("variant", _zoo_variants())
def test_template_omits_bos_matches_what_transformers_feeds(variant, tiny_checkpoint):
    """The rule that decides ``add_special_tokens`` for an endpoint: transformers' own tokenized chat
    prompt starts with a BOS that the rendered template text does not hold."""
    from transformers import AutoProcessor

    from vlm.eval.endpoint import template_omits_bos
    from vlm.export.verify import probe_messages

    processor = AutoProcessor.from_pretrained(tiny_checkpoint(variant))
    tok = processor.tokenizer
    rendered = processor.apply_chat_template(probe_messages(), add_generation_prompt=True)
    with_image = [{**m, "content": [{**c, "image": Image.new("RGB", (56, 56), (120, 30, 200))}
                                    if c.get("type") == "image" else c for c in m["content"]]}
                  if isinstance(m["content"], list) else m for m in probe_messages()]
    out = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    first = int(out["input_ids"][0, 0])
    fed_bos = tok.bos_token_id is not None and first == tok.bos_token_id
    assert template_omits_bos(processor) == (fed_bos and not rendered.startswith(tok.bos_token))


@pytest.mark.parametrize("variant,expected", [("llava", True), ("qwen2_vl", False)])
def test_endpoint_eval_asks_for_the_bos_the_template_omits(variant, expected, stub, tmp_path, tiny_checkpoint):
    """`vlm eval --model M --endpoint URL`: LLaVA-1.5's template writes no BOS but the model is trained
    and evaluated locally with one, so requests ask vLLM to add it; Qwen2-VL has no BOS."""
    from vlm.eval.harness import EvalConfig, run_eval

    config = EvalConfig(data=str(write_eval_file(tmp_path / "data")), model=str(tiny_checkpoint(variant)),
                        endpoint=stub, served_model="served-name", out=str(tmp_path / "out"),
                        max_new_tokens=3, meteor=False, spice=False, device="cpu")
    run_eval(config, log=lambda msg: None)
    assert _Stub.received and all(body.get("add_special_tokens", False) is expected for _, body in _Stub.received)
