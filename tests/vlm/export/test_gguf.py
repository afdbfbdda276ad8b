"""GGUF export: refusals before work (CPU suite), and, marked ``gguf`` (``make test-gguf``), each zoo
family llama.cpp runs exported, loaded by llama.cpp + mtmd and compared with transformers."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from vlm.families.registry import all_families
from vlm.zoo import build_tiny

from .gguf_zoo import build_gguf_zoo

GGUF_VARIANTS = [v for f in all_families().values() if f.gguf for v in f.zoo_variants]
NO_GGUF_VARIANTS = [v for f in all_families().values() if not f.gguf for v in f.zoo_variants]
# f16 weights, fp32 activations on both sides: measured max |Δ logit| on the zoo models is ~1e-3 of
# logits up to ~0.5; the bound leaves room for other CPUs' kernels, not for a wrong layer.
F16_LOGIT_TOL = 2e-2


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("variant", NO_GGUF_VARIANTS)
def test_family_llama_cpp_cannot_run_is_refused_first(variant, tmp_path, monkeypatch):
    from vlm.export.gguf import GgufExportError, export_gguf

    monkeypatch.setenv("VLM_GGUF_CACHE", str(tmp_path / "empty-cache"))   # no toolchain either:
    monkeypatch.delenv("VLM_LLAMA_CPP_SRC", raising=False)               # the family is named first
    src = build_tiny(variant, tmp_path / variant)
    with pytest.raises(GgufExportError, match="llama.cpp cannot run"):
        export_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_toolchain_is_named(tmp_path, monkeypatch):
    from vlm.export.gguf import export_gguf
    from vlm.export.gguf_toolchain import GgufToolchainMissing

    monkeypatch.setenv("VLM_GGUF_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("VLM_LLAMA_CPP_SRC", raising=False)
    src = build_tiny(GGUF_VARIANTS[0], tmp_path / "m")
    with pytest.raises(GgufToolchainMissing, match="make gguf-deps"):
        export_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_pre_tokenizer_named_from_split_regex(variant, tmp_path):
    """The zoo's retrained BPEs carry their family's split regex: it names llama.cpp's pre-tokenizer;
    an edited regex is refused with the file named."""
    from vlm.export.gguf_convert import TokenizerNotConvertible, pre_tokenizer_from_regex, split_regex

    src = build_tiny(variant, tmp_path / variant)
    if split_regex(src) is None:
        pytest.skip(f"{variant}: SentencePiece-style tokenizer, no split regex (converted as SPM)")
    assert pre_tokenizer_from_regex(src) in {"qwen2", "llama-bpe", "tekken"}
    tok = json.loads((src / "tokenizer.json").read_text())
    steps = tok["pre_tokenizer"]["pretokenizers"]
    steps[0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TokenizerNotConvertible, match="tokenizer.json"):
        pre_tokenizer_from_regex(src)


def test_modelfile_names_both_files_and_template():
    from vlm.export.gguf_modelfile import modelfile_text

    for fam in all_families().values():
        if not fam.gguf:
            continue
        text = modelfile_text(fam, "model-q8_0.gguf", "mmproj-f16.gguf")
        froms = [ln for ln in text.splitlines() if ln.startswith("FROM ")]
        assert froms == ["FROM ./model-q8_0.gguf", "FROM ./mmproj-f16.gguf"]
        assert 'TEMPLATE """' in text and all(f'PARAMETER stop "{s}"' in text for s in fam.gguf.stop)


# ---- llama.cpp runs (make test-gguf) -------------------------------------------------------------

gguf = pytest.mark.gguf


def _toolchain_or_fail():
    from vlm.export.gguf_toolchain import llama_cpp_source, require_runtime

    llama_cpp_source()
    require_runtime("the gguf tests")


@gguf
@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_export_runs_in_llama_cpp_and_matches_transformers(variant, tmp_path):
    from vlm.export.gguf import export_gguf
    from vlm.export.gguf_verify import compare_with_transformers

    _toolchain_or_fail()
    src = build_gguf_zoo(variant, tmp_path / "src")
    out = export_gguf(src, tmp_path / "gguf", quant="f16")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "mmproj-f16.gguf", "model-f16.gguf"]
    r = compare_with_transformers(out, src, n_tokens=8)
    assert r["prompt_tokens_equal"], r
    assert r["tokens_equal"], r
    assert r["max_abs_logit_diff"] < F16_LOGIT_TOL, r


@gguf
def test_unconvertible_tokenizer_refused_before_work(tmp_path):
    from vlm.export.gguf import GgufExportError, export_gguf
    from vlm.export.gguf_convert import split_regex

    _toolchain_or_fail()
    variant = next(v for v in GGUF_VARIANTS if split_regex(build_tiny(v, tmp_path / "probe" / v)))
    src = build_tiny(variant, tmp_path / "src")
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(GgufExportError, match="tokenizer.json"):
        export_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "probe")


@gguf
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_export_top1_agreement(quant, tmp_path):
    from vlm.export.gguf import export_gguf
    from vlm.export.gguf_verify import compare_with_transformers

    _toolchain_or_fail()
    variant = GGUF_VARIANTS[0]
    src = build_gguf_zoo(variant, tmp_path / "src")
    out = export_gguf(src, tmp_path / "gguf", quant=quant)
    r = compare_with_transformers(out, src, n_tokens=8)
    print(f"{variant} {quant}: {json.dumps(r)}")
    assert r["prompt_tokens_equal"], r
    # random tiny weights have near-flat logits: report, and guard only against a broken file
    assert r["top1_agreement"] >= 0.5 and r["kl_mean"] < 0.1, r
    assert os.path.getsize(out / f"model-{quant}.gguf") < os.path.getsize(out / "mmproj-f16.gguf") * 10


@gguf
def test_eval_gguf_variant_in_the_same_table(tmp_path):
    """`vlm eval --compare bf16,gguf:f16`: the llama.cpp run gets KL / top-1 against bf16 like nf4 does."""
    import numpy as np
    from PIL import Image

    from vlm.eval.harness import EvalConfig, run_eval

    _toolchain_or_fail()
    variant = GGUF_VARIANTS[0]
    src = build_gguf_zoo(variant, tmp_path / "src")
    rng = np.random.default_rng(0)
    records = []
    for i, cap in enumerate(["a red circle on white", "two blue squares"]):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"id": f"i{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": cap}]})
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    res = run_eval(EvalConfig(data=str(tmp_path / "eval.jsonl"), model=str(src), compare=["bf16", "gguf:f16"],
                              out=str(tmp_path / "report"), max_new_tokens=6, meteor=False, device="cpu"),
                   log=lambda m: None)
    by_name = {v["name"]: v for v in res["variants"]}
    g = by_name["gguf:f16"]
    assert g["kind"] == "gguf"
    assert g["teacher_forced"]["caption_tokens"] == by_name["bf16"]["teacher_forced"]["caption_tokens"] > 0
    # bf16 baseline vs f16 weights in fp32 compute: close, not equal
    assert 0 <= g["agreement"]["kl_mean"] < 1e-2 and g["agreement"]["top1_agreement"] >= 0.8, g
