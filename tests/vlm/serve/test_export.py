"""`vlm export`: --check-vllm refusals (before any server starts) and the merged 16-bit checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vlm.export.adapter import AdapterError
from vlm.export.check import AdapterRejected, check_adapter, max_lora_rank_for, require_servable
from vlm.export.merge import ExportError, export_merged
from vlm.export.verify import compare_merged, logits, probe_inputs


def _vlm(*args):
    return subprocess.run([sys.executable, "-m", "vlm", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_check_vllm_accepts_language_lora(trained_adapter):
    report = check_adapter(trained_adapter)
    assert report.ok and report.problems == [], report.format()
    assert report.info.ranks() == [8] and report.max_lora_rank == 8
    assert len(report.info.lora_modules) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down


def test_check_vllm_refuses_lm_head_target(make_adapter):
    adapter = make_adapter(targets=["language.attention", "lm_head"])
    report = check_adapter(adapter)
    assert not report.ok
    assert {p.code for p in report.problems if p.fatal} <= {"lm_head", "full_weights"}
    assert "lm_head" in [p.code for p in report.problems]
    assert "merged" in report.format()
    with pytest.raises(AdapterRejected, match="lm_head"):
        require_servable(adapter)
    res = _vlm("export", adapter, "--check-vllm")
    assert res.returncode == 3 and "ERROR [lm_head]" in res.stdout and "fix:" in res.stdout


def test_check_vllm_refuses_modules_to_save(make_adapter):
    adapter = make_adapter(modules_to_save=["lm_head"])
    report = check_adapter(adapter)
    assert [p.code for p in report.problems if p.fatal] == ["modules_to_save"]
    assert report.info.full_modules == ["lm_head"]


def test_check_vllm_rank_and_peft_features(trained_adapter, tmp_path):
    assert max_lora_rank_for([4]) == 8 and max_lora_rank_for([8, 16]) == 16 and max_lora_rank_for([300]) == 320
    with pytest.raises(AdapterRejected, match="above vLLM's maximum"):
        max_lora_rank_for([1024])
    bad = tmp_path / "dora"
    bad.mkdir()
    for f in trained_adapter.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(use_dora=True, init_lora_weights="pissa", rank_pattern={"q_proj": 1024})
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    codes = {p.code for p in check_adapter(bad).problems if p.fatal}
    assert codes == {"dora", "init", "rank"}


def test_missing_or_incomplete_adapter_folder(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        check_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        check_adapter(tmp_path / "empty")
    res = _vlm("export", tmp_path / "nope", "--check-vllm")
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_merged_export_matches_base_plus_adapter(servable_base, trained_adapter, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = export_merged(trained_adapter, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "processor_config.json", "generation_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"] and "quantization_config" not in cfg
    assert cfg["vlmtune"]["resolution"] == {"min_pixels": 3136, "max_pixels": 12544}
    assert cfg["vlmtune"]["merged_from"] == str(trained_adapter)

    # Plain transformers loads it; logits match PEFT base+adapter (fp32 tolerance: 1e-4 of max |logit|).
    result = compare_merged(trained_adapter, out)
    assert result["ok"] and result["relative"] < 1e-4, result
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForImageTextToText.from_pretrained(servable_base, dtype=torch.float32)
    inputs = probe_inputs(AutoProcessor.from_pretrained(out))
    # ... and the adapter mattered: merged logits are far from the base's.
    assert (logits(merged, inputs) - logits(base, inputs)).abs().max() > 1.0

    with pytest.raises(ExportError, match="already exists"):
        export_merged(trained_adapter, out)


def test_merge_dequantizes_a_4bit_base(servable_base, trained_adapter, tmp_path):
    """A base stored in NF4 is dequantized before merging: merged = dequant(Q) + s·B·A exactly."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    q = AutoModelForImageTextToText.from_pretrained(
        servable_base, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               llm_int8_skip_modules=["model.visual", "lm_head"]))
    q.save_pretrained(tmp_path / "base-nf4")
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (tmp_path / "base-nf4" / f).write_bytes((servable_base / f).read_bytes())
    out = export_merged(trained_adapter, tmp_path / "merged", base=str(tmp_path / "base-nf4"))
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    result = compare_merged(trained_adapter, out, base=str(tmp_path / "base-nf4"))
    assert result["ok"], result


def test_merge_of_a_qlora_adapter_uses_the_recorded_plan(make_adapter, tmp_path):
    """QLoRA (base loaded NF4 by vlm.quant): merging reloads the base under the recorded plan and
    dequantizes it, so the merged model equals what was trained (NF4 weights + LoRA), not the
    original 16-bit weights + LoRA."""
    adapter = make_adapter(quant="nf4", steps=3)
    meta = json.loads((adapter / "vlmtune.json").read_text())["vlmtune"]
    assert meta["quant"]["counts"]["quantized"]  # training really ran on a 4-bit base
    out = export_merged(adapter, tmp_path / "merged")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vlmtune"]["trained_on_quant"]["dynamic"] is False and "quantization_config" not in cfg
    result = compare_merged(adapter, out)
    assert result["ok"], result
