"""Readers and validation: valid records round-trip, every corruption yields its named error."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm.data_formats import problems
from vlm.data_formats.json_stream import iter_json_array
from vlm.data_formats.mixing import mix_epoch
from vlm.data_formats.reader import iter_conversations, read_conversations
from vlm.data_formats.records import parse_record
from vlm.data_formats.rejects import RejectLog
from vlm.errors import DataError

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).filter(
    lambda t: "<image>" not in t and "<video>" not in t)
ANSWER = TEXT.filter(str.strip)   # an empty or whitespace-only reply is refused (empty_reply)
ROLE_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}


@st.composite
def sharegpt_records(draw):
    """Valid LLaVA records: 1-4 user/assistant exchanges, 0-3 images placed in user turns."""
    n_images = draw(st.integers(0, 3))
    n_pairs = draw(st.integers(1, 4))
    turns = []
    if draw(st.booleans()):
        turns.append({"from": "system", "value": draw(TEXT)})
    slots = sorted(draw(st.lists(st.integers(0, n_pairs - 1), min_size=n_images, max_size=n_images)))
    for k in range(n_pairs):
        q = draw(TEXT)
        for _ in range(slots.count(k)):
            q = "<image>\n" + q
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": draw(ANSWER)}]
    rec = {"id": str(draw(st.integers(0, 10**6))), "conversations": turns}
    if n_images:
        paths = [f"img/{i}.png" for i in range(n_images)]
        rec["image"] = paths[0] if n_images == 1 else paths
    return rec


@given(sharegpt_records())
@settings(max_examples=150, deadline=None)
def test_sharegpt_round_trip(record):
    conv = parse_record(record, source="mem", index=0)
    assert conv.to_sharegpt() == record
    # and through the messages form: same turns, same image count
    msgs = {"messages": [{"role": t["role"], "content": t["content"]} for t in conv.to_messages()],
            "images": [img.value for img in conv.images]}
    again = parse_record(msgs)
    assert again.roles() == conv.roles()
    assert again.image_order() == conv.image_order()


def _corrupt(record, kind):
    """Apply one named corruption; returns (record, expected problem code)."""
    r = json.loads(json.dumps(record))
    turns = r["conversations"]
    if kind == problems.UNKNOWN_ROLE:
        turns[-1]["from"] = "robot"
    elif kind == problems.NON_STRING_CONTENT:
        turns[-1]["value"] = 42
    elif kind == problems.PLACEHOLDER_MISMATCH:
        turns[-2]["value"] += "<image>"
    elif kind == problems.NO_ASSISTANT_TURN:
        r["conversations"] = [t for t in turns if t["from"] != "gpt"]
    elif kind == problems.EMPTY_CONVERSATION:
        r["conversations"] = []
        r.pop("image", None)
    elif kind == problems.WRONG_TYPE:
        r["conversations"] = {"0": turns[0]}
    elif kind == problems.UNKNOWN_FORMAT:
        r["dialog"] = r.pop("conversations")
    return r


@given(sharegpt_records(), st.sampled_from([problems.UNKNOWN_ROLE, problems.NON_STRING_CONTENT,
                                            problems.PLACEHOLDER_MISMATCH, problems.NO_ASSISTANT_TURN,
                                            problems.EMPTY_CONVERSATION, problems.WRONG_TYPE,
                                            problems.UNKNOWN_FORMAT]))
@settings(max_examples=150, deadline=None)
def test_each_corruption_yields_its_named_error(record, kind):
    with pytest.raises(DataError) as e:
        parse_record(_corrupt(record, kind), source="data.jsonl", index=7)
    assert e.value.code == kind
    assert "data.jsonl" in str(e.value) and "record 7" in str(e.value)
    assert f"id={record['id']!r}" in str(e.value) or kind == problems.WRONG_TYPE


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 12), "red").save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.new("L", (2000, 2000)).save(tmp_path / "img" / "big.png")
    (tmp_path / "outside.png").write_bytes((tmp_path / "img" / "ok.png").read_bytes())
    return tmp_path


def _rec(image, rid="x"):
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}


@pytest.mark.parametrize("image,code", [
    ("img/missing.png", problems.MISSING_IMAGE),
    ("img/corrupt.png", problems.CORRUPT_IMAGE),
    ("img/big.png", problems.IMAGE_TOO_LARGE),
    ("../outside.png", problems.PATH_ESCAPE),
    ("/etc/hostname", problems.PATH_ESCAPE),
    ("data:image/png;base64,@@@", problems.CORRUPT_IMAGE),
])
def test_image_problems_are_named(image_dir, image, code):
    root = image_dir / "img" / ".."
    data = image_dir / "img" / "d.jsonl"
    data.write_text(json.dumps(_rec("ok.png", "good")) + "\n" +
                    json.dumps(_rec(image.replace("img/", ""), "bad")) + "\n")
    with pytest.raises(DataError) as e:
        list(iter_conversations(data, max_image_pixels=1_000_000))
    assert e.value.code == code and e.value.index == 1 and e.value.record_id == "bad"
    assert str(data) in str(e.value)
    del root
    # skip: counted, reported, written to the rejects file; the good record survives
    with RejectLog(image_dir / "rejects.jsonl") as rejects:
        kept = list(iter_conversations(data, on_error="skip", rejects=rejects, max_image_pixels=1_000_000))
    assert [c.record_id for c in kept] == ["good"]
    assert rejects.counts == {code: 1}
    line = json.loads((image_dir / "rejects.jsonl").read_text())
    assert line["code"] == code and line["id"] == "bad" and line["record"]["id"] == "bad"


def test_skip_without_reject_log_is_refused(tmp_path):
    with pytest.raises(Exception, match="RejectLog"):
        list(iter_conversations([_rec("a.png")], on_error="skip"))


def test_invalid_json_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": []}) + "\n\n{oops\n")
    with RejectLog() as rejects:
        list(iter_conversations(p, on_error="skip", rejects=rejects))
    codes = [(e.code, e.index) for e in rejects.errors]
    assert codes == [(problems.EMPTY_CONVERSATION, 0), (problems.INVALID_JSON, 1)]
    assert "line 3" in rejects.errors[1].problem
    arr = tmp_path / "d.json"
    arr.write_text('[\n{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},\n{"a": }\n]')
    with RejectLog() as rejects:
        assert len(list(iter_conversations(arr, on_error="skip", rejects=rejects))) == 1
    assert rejects.errors[0].code == problems.INVALID_JSON and "line 3" in rejects.errors[0].problem


@given(st.lists(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=40),
                                                               st.floats(allow_nan=False), st.none()),
                                max_size=4), max_size=30),
       st.integers(1, 50), st.booleans())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_json_array_streaming_equals_json_load(items, chunk, indent):
    text = json.dumps(items, indent=1 if indent else None)
    assert [v for v, _ in iter_json_array(io.StringIO(text), chunk=chunk)] == items


def test_messages_formats_and_sources(tmp_path):
    import base64

    import datasets

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "a.png")
    rec = {"id": "m", "images": ["a.png"], "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": url}},
                                     {"type": "image", "path": "a.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]}
    conv = read_conversations([rec], image_root=str(tmp_path))[0]
    assert [i.kind for i in conv.images] == ["path", "data_url", "path"]
    # parquet and a datasets folder with an Image column, and an in-memory Dataset with PIL
    ds = datasets.Dataset.from_list([{"image": {"bytes": png.getvalue(), "path": None},
                                      "conversations": [{"from": "human", "value": "<image>hi"},
                                                        {"from": "gpt", "value": "blue"}]}] * 3)
    ds = ds.cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    for src in (tmp_path / "d.parquet", tmp_path / "dsdir", ds):
        convs = read_conversations(src)
        assert len(convs) == 3 and convs[0].images[0].kind in ("bytes", "pil")


def test_mixing_weights():
    a, b = list(range(10)), list(range(100, 120))
    mixed = mix_epoch([a, b], [2.0, 0.5], seed=3)
    assert sorted(x for x in mixed if x < 100) == sorted(a * 2)
    assert len([x for x in mixed if x >= 100]) == 10
    assert mixed == mix_epoch([a, b], [2.0, 0.5], seed=3)
