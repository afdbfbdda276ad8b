"""Records in other tools' layouts, as their users have them: LLaMA-Factory, LLaVA, Qwen2-VL-Finetune,
ShareGPT4V and TRL. Each layout goes through `vlm data check`, `vlm data preview` and a training step
on every zoo family (the records are written here, after each tool's documented layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.cli.main import main as vlm_main
from vlm.data_formats import problems
from vlm.data_formats.collator import IGNORE_INDEX, VisionChatCollator
from vlm.data_formats.conversation import Conversation, ImageRef, ImageSlot, Turn
from vlm.data_formats.reader import read_conversations
from vlm.data_formats.records import parse_record
from vlm.errors import DataError
from vlm.zoo import VARIANTS


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One data file per tool, images beside them in the folder layout each tool uses."""
    root = tmp_path_factory.mktemp("layouts")
    (root / "mllm_demo_data").mkdir()
    (root / "coco" / "train2017").mkdir(parents=True)
    (root / "sam" / "images").mkdir(parents=True)
    sizes = [(64, 48), (40, 72), (56, 56)]
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 200 - 50 * i, 90)).save(root / "mllm_demo_data" / f"{i}.jpg")
        Image.new("RGB", (w, h), (200, 40 * i, 90)).save(root / "coco" / "train2017" / f"{i:012d}.jpg")
    Image.new("RGB", (60, 44), (10, 120, 220)).save(root / "sam" / "images" / "sa_1.jpg")
    files = {}
    # LLaMA-Factory, sharegpt formatting with `messages` (role/content tags), `<image>` in text,
    # images listed in `images`, and a top-level `system` column.
    files["llamafactory_messages"] = _write_json(root / "mllm_demo.json", [
        {"messages": [{"content": "<image>Who are they?", "role": "user"},
                      {"content": "Two players celebrating a goal.", "role": "assistant"},
                      {"content": "What are they doing?<image>", "role": "user"},
                      {"content": "They are hugging on the pitch after scoring.", "role": "assistant"}],
         "images": ["mllm_demo_data/0.jpg", "mllm_demo_data/1.jpg"]},
        {"messages": [{"content": "<image>Describe the colours.", "role": "user"},
                      {"content": "Mostly green with a blue patch.", "role": "assistant"}],
         "images": ["mllm_demo_data/2.jpg"], "system": "Answer in one sentence."},
    ])
    # LLaMA-Factory, sharegpt formatting with `conversations` (from/value tags) and `system` column.
    files["llamafactory_conversations"] = _write_jsonl(root / "lf_sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "<image>What is in the picture?"},
                           {"from": "gpt", "value": "A coloured rectangle."}],
         "system": "You are a careful annotator.", "images": ["mllm_demo_data/1.jpg"]},
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
    ])
    # LLaVA-1.5 instruct mix: `image` (one path), `<image>\n` first, text-only records without `image`.
    files["llava"] = _write_json(root / "llava_v1_5_mix.json", [
        {"id": "000000000000", "image": "coco/train2017/000000000000.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is the object?"},
                           {"from": "gpt", "value": "It is red."},
                           {"from": "human", "value": "Is it large?"},
                           {"from": "gpt", "value": "It fills the frame."}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "Name a prime number."},
                                           {"from": "gpt", "value": "Seven."}]},
    ])
    # Qwen2-VL-Finetune: LLaVA layout, `image` may be a list, several `<image>\n` in one turn.
    files["qwen2vl_finetune"] = _write_json(root / "qwen2vl_ft.json", [
        {"id": "q-0", "image": ["coco/train2017/000000000001.jpg", "coco/train2017/000000000002.jpg"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat differs between them?"},
                           {"from": "gpt", "value": "The second one is taller."}]},
    ])
    # ShareGPT4V: the image placeholder at the end of the question.
    files["sharegpt4v"] = _write_json(root / "sharegpt4v_instruct.json", [
        {"id": "sa_1", "image": "sam/images/sa_1.jpg",
         "conversations": [{"from": "human", "value": "What do you see happening in this image?\n<image>"},
                           {"from": "gpt", "value": "A blue surface under even light, nothing moves."}]},
    ])
    # TRL (SFTTrainer, vision): `messages` with typed parts; `images` list or a singular `image`.
    files["trl"] = _write_jsonl(root / "trl.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                   {"type": "text", "text": "What is shown?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A green block."}]}],
         "images": ["mllm_demo_data/2.jpg"]},
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": [{"type": "text", "text": "Caption this."},
                                                   {"type": "image"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A red block."}]}],
         "image": "mllm_demo_data/0.jpg"},
    ])
    # TRL prompt-completion (conversational): only the completion trains.
    files["trl_prompt_completion"] = _write_jsonl(root / "trl_pc.jsonl", [
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Green."}]},
                    {"role": "user", "content": [{"type": "text", "text": "And its shape?"}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "A square."}]}],
         "images": ["mllm_demo_data/2.jpg"]},
    ])
    return root, files


EXPECTED_RECORDS = {"llamafactory_messages": 2, "llamafactory_conversations": 2, "llava": 2,
                    "qwen2vl_finetune": 1, "sharegpt4v": 1, "trl": 2, "trl_prompt_completion": 1}


def test_every_layout_passes_data_check(layouts, capsys):
    _, files = layouts
    rc = vlm_main(["data", "check", *map(str, files.values())])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name, path in files.items():
        n = EXPECTED_RECORDS[name]
        assert f"{path}: {n} records, {n} valid, 0 bad" in out


def test_top_level_system_column_and_singular_image_are_used(layouts):
    _, files = layouts
    lf = read_conversations(str(files["llamafactory_messages"]))[1]
    assert lf.turns[0].role == "system" and lf.turns[0].text == "Answer in one sentence."
    sharegpt = read_conversations(str(files["llamafactory_conversations"]))[0]
    assert sharegpt.turns[0].text == "You are a careful annotator."
    trl = read_conversations(str(files["trl"]))[1]
    assert [i.value for i in trl.images] == ["mllm_demo_data/0.jpg"]


def test_trl_prompt_completion_trains_the_completion_only(layouts, tiny_checkpoint):
    _, files = layouts
    conv = read_conversations(str(files["trl_prompt_completion"]))[0]
    _, collator = _collator(tiny_checkpoint, "qwen2_vl")
    batch = collator([conv])
    trained = [t for t, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist())
               if lab != IGNORE_INDEX]
    assert collator.tokenizer.decode(trained) == "A square.<|im_end|>"
    assert "Green." in collator.plan(conv).text


@pytest.mark.parametrize("layout", ["conversations", "messages"])
def test_both_image_and_images_is_an_error_not_a_silent_choice(layout):
    turns = ([{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}]
             if layout == "conversations" else
             [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}])
    rec = {layout: turns, "image": "a.png", "images": ["b.png"]}
    with pytest.raises(DataError) as e:
        parse_record(rec, source="d.jsonl", index=4)
    assert e.value.code == problems.WRONG_TYPE and "both 'image' and 'images'" in str(e.value)
    assert "d.jsonl, record 4" in str(e.value)


def test_system_turn_and_column_together_is_an_error():
    rec = {"system": "a", "messages": [{"role": "system", "content": "b"}, {"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "r"}]}
    with pytest.raises(DataError, match="both a top-level 'system'"):
        parse_record(rec)


def _collator(tiny_checkpoint, variant, **kwargs):
    from transformers import AutoProcessor

    from vlm.families import family_for_config
    from vlm.load import load_config

    path = tiny_checkpoint(variant)
    processor = AutoProcessor.from_pretrained(str(path))
    return path, VisionChatCollator(processor, family_for_config(load_config(path)),
                                    pad_to_multiple_of=1, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layout_trains_on_every_family(layouts, tiny_checkpoint, variant):
    """Every record of every layout: planned, collated, and one optimizer step taken on it."""
    from transformers import AutoModelForImageTextToText

    root, files = layouts
    path, collator = _collator(tiny_checkpoint, variant)
    convs = [c for f in files.values() for c in read_conversations(str(f))]
    assert len(convs) == sum(EXPECTED_RECORDS.values())
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for conv in convs:
        plan = collator.plan(conv)
        for t in conv.turns:   # every system prompt reaches the rendered text
            if t.role == "system":
                assert t.text in plan.text
        batch = collator([conv])
        assert (batch["labels"] != IGNORE_INDEX).sum() == plan.trainable_tokens
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_family_trains_its_end_of_turn_token(tiny_checkpoint, variant):
    """Each trained assistant span ends with the token that stops generation (LLaVA-1.5's template
    writes no `</s>`: without it the model never learns to stop)."""
    from transformers import GenerationConfig

    path, collator = _collator(tiny_checkpoint, variant)
    image = Image.new("RGB", (48, 40), "red")
    conv = Conversation([Turn("system", ["Be brief."]), Turn("user", [ImageSlot(0), "What colour?"]),
                         Turn("assistant", ["Red."]), Turn("user", ["Sure?"]), Turn("assistant", ["Yes."])],
                        [ImageRef("pil", image)], source="mem", index=0)
    batch = collator([conv])
    labels = batch["labels"][0].tolist()
    runs, current = [], []
    for lab in labels + [IGNORE_INDEX]:
        if lab != IGNORE_INDEX:
            current.append(lab)
        elif current:
            runs.append(current)
            current = []
    stops = GenerationConfig.from_pretrained(str(path)).eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    eot = collator.tokenizer.convert_tokens_to_ids(collator.family.end_of_turn)
    assert eot in stops
    assert len(runs) == 2 and all(run[-1] == eot for run in runs), \
        [collator.tokenizer.convert_ids_to_tokens(r) for r in runs]


def test_preview_of_a_valid_record_after_a_bad_one(tmp_path, tiny_checkpoint, capsys):
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "a.png")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                {"from": "gpt", "value": "Blue."}]}
    data = _write_jsonl(tmp_path / "d.jsonl", [good, {"conversations": "oops"}, good, good])
    model = str(tiny_checkpoint("qwen2_vl"))
    assert vlm_main(["data", "preview", str(data), "--model", model, "--index", "3"]) == 0
    assert "record 3" in capsys.readouterr().out
    assert vlm_main(["data", "preview", str(data), "--model", model, "--index", "1"]) == 1
    assert "record 1: 'conversations' must be a list" in capsys.readouterr().err


def test_newline_before_an_image_part_is_kept(tiny_checkpoint):
    _, collator = _collator(tiny_checkpoint, "qwen2_vl")
    image = Image.new("RGB", (32, 32), "blue")
    conv = parse_record({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Which book is this?\n"}, {"type": "image"}]},
        {"role": "assistant", "content": "A novel."}], "images": [image]})
    text = collator.plan(conv).text
    assert "Which book is this?\n<|vision_start|>" in text
    assert text == collator.processor.apply_chat_template(conv.to_messages(), tokenize=False)


def test_absolute_image_path_error_says_how_to_allow_it(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "abs.png")
    data = tmp_path / "sub"
    data.mkdir()
    rec = {"image": str(tmp_path / "abs.png"),
           "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}
    _write_jsonl(data / "d.jsonl", [rec])
    with pytest.raises(DataError) as e:
        read_conversations(str(data / "d.jsonl"))
    assert e.value.code == problems.PATH_ESCAPE
    assert "data.image_root" in str(e.value) and "--image-root" in str(e.value)
    assert len(read_conversations(str(data / "d.jsonl"), image_root=str(tmp_path))) == 1
