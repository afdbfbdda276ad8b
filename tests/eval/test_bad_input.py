"""Bad input gives errors a person can act on (file, record, what is wrong)."""

import json
import socket

import pytest

from vlm.cli.main import main
from vlm.errors import ConfigError, DataError
from vlm.eval.data import read_eval_items
from vlm.eval.endpoint import EndpointClient, EndpointError
from vlm.eval.generation import GenerationSettings

from ._helpers import write_eval_file


def test_record_without_reference_caption(tmp_path):
    bad = {"id": "noref", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."}]}
    path = write_eval_file(tmp_path, extra_records=[bad])
    with pytest.raises(DataError) as e:
        read_eval_items(path)
    msg = str(e.value)
    assert "eval.jsonl" in msg and "noref" in msg and "assistant" in msg


def test_record_with_empty_reference_caption(tmp_path):
    bad = {"id": "empty", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "  "}]}
    path = write_eval_file(tmp_path, extra_records=[bad])
    # the reader refuses an empty reply first (empty_reply), for training and eval alike
    with pytest.raises(DataError, match="reference caption|empty or whitespace only"):
        read_eval_items(path)


def test_eval_file_without_images(tmp_path):
    path = tmp_path / "text_only.jsonl"
    path.write_text(json.dumps({"id": "t0", "conversations": [
        {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "a caption"}]}) + "\n")
    with pytest.raises(DataError) as e:
        read_eval_items(path)
    assert "no image" in str(e.value) and "t0" in str(e.value)


def test_empty_and_missing_eval_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no records"):
        read_eval_items(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_eval_items(tmp_path / "nope.jsonl")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there now
    return port


def test_unreachable_endpoint(tmp_path):
    items = read_eval_items(write_eval_file(tmp_path))
    client = EndpointClient(f"http://127.0.0.1:{_closed_port()}/v1", "tiny", timeout=5)
    with pytest.raises(EndpointError, match="cannot reach the endpoint .*Is the server running"):
        client.generate(items, GenerationSettings(max_new_tokens=4))


def test_cli_errors_are_one_line(tmp_path, capsys):
    data = write_eval_file(tmp_path)
    rc = main(["eval", "--data", str(data), "--endpoint", f"http://127.0.0.1:{_closed_port()}",
               "--served-model", "tiny", "--out", str(tmp_path / "out"), "--no-meteor"])
    err = capsys.readouterr().err
    assert rc == 1 and "error: cannot reach the endpoint" in err
    assert not (tmp_path / "out" / "results.json").exists()
    assert main(["eval", "--data", str(data), "--endpoint", "http://127.0.0.1:1"]) == 1
    assert "--served-model" in capsys.readouterr().err
    assert main(["eval", "--model", "x"]) == 1
    assert "--data" in capsys.readouterr().err


def test_config_rejects_unknown_yaml_key(tmp_path):
    from vlm.eval.harness import EvalConfig

    with pytest.raises(ConfigError, match="max_new_tokens"):
        EvalConfig.from_dict({"data": "x", "model": "m", "max_new_token": 3})
