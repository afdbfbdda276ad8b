"""``vlm export SOURCE --gguf OUT [--quant f16|q8_0|q4_k_m]``: llama.cpp / Ollama files.

OUT receives ``model-<quant>.gguf`` (the language model), ``mmproj-f16.gguf`` (vision tower +
projector, the file llama.cpp's multimodal runtime ``mtmd`` loads beside it) and an Ollama
``Modelfile``. SOURCE is a PEFT adapter (merged first, exactly as ``--merged`` does: a 4-bit base
is dequantized under its recorded plan, then W = W0 + s·B·A) or a 16-bit checkpoint folder.

Order: everything that can refuse is asked before any weight is touched — the family (llama.cpp
runs it?), its SentencePiece model where the converter reads one (Gemma 3's ``tokenizer.model``,
taken from the base checkpoint for an adapter), the toolchain (converter sources; the runtime for q4_k_m), and the tokenizer (the
converter's own ``--vocab-only`` pass on it). Then merge, convert, quantize, write atomically.

Quantization: the converter writes f16 and q8_0 itself; q4_k_m is llama.cpp's quantizer
(``llama_model_quantize`` from the built runtime) run on the f16 file. k-quants work on rows of 256
values: a tensor whose rows are not a multiple of 256 gets llama.cpp's fallback type (it says so on
stderr), as it would for any model. The projector stays f16 at every level (the common practice:
it is small and the image features are sensitive).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from vlm.errors import VlmError
from vlm.export.gguf_toolchain import converter_env, llama_cpp_source, require_runtime

QUANTS = ("f16", "q8_0", "q4_k_m")
MMPROJ_FILE = "mmproj-f16.gguf"


class GgufExportError(VlmError):
    """The GGUF export cannot be done (and nothing was written)."""


def model_file(quant: str) -> str:
    return f"model-{quant}.gguf"


def _source_folders(source: Path, base: str | None) -> tuple[bool, Path]:
    """(is_adapter, folder holding config.json + tokenizer for the pre-flight)."""
    if (source / "adapter_config.json").is_file():
        from vlm.export.adapter import read_adapter
        from vlm.export.metadata import read_metadata

        info = read_adapter(source)
        base_path = base or read_metadata(info.path).get("base_model") or info.base_model
        if not base_path or not (Path(base_path) / "config.json").is_file():
            raise GgufExportError(f"{source}: its base model {base_path!r} is not a local folder; pass --base "
                                  "BASE_CHECKPOINT_FOLDER")
        return True, Path(base_path)
    if (source / "config.json").is_file():
        cfg = json.loads((source / "config.json").read_text())
        if cfg.get("quantization_config"):
            raise GgufExportError(f"{source} is stored quantized ({cfg['quantization_config'].get('quant_method')}); "
                                  "llama.cpp's converter reads 16/32-bit weights: export the 16-bit checkpoint, "
                                  "or an adapter trained on it (it is dequantized before merging)")
        return False, source
    raise GgufExportError(f"{source} is neither a PEFT adapter (adapter_config.json) nor a checkpoint (config.json)")


def _family(config_dir: Path):
    from vlm.families.registry import family_for_config
    from vlm.load import load_config

    family = family_for_config(load_config(config_dir))
    if family.gguf is None:
        raise GgufExportError(f"{config_dir}: no verified llama.cpp route for {family.description} (llama.cpp "
                              "cannot run it, or its projector GGUF does not load: see the family file); "
                              "`vlm export --merged` gives a checkpoint vLLM and transformers run")
    return family


def _run_converter(model_dir: Path, out: Path, outtype: str, *, mmproj: bool = False, vocab_only: bool = False,
                   renames: tuple[tuple[str, str], ...] = (), layer_types_pattern: bool = False) -> None:
    from vlm.export.gguf_convert import EXIT_ARCH, EXIT_TOKENIZER

    cmd = [sys.executable, "-m", "vlm.export.gguf_convert", str(model_dir), str(out), "--outtype", outtype]
    cmd += ["--mmproj"] * mmproj + ["--vocab-only"] * vocab_only
    for old, new in renames:
        cmd += ["--rename-prefix", old, new]
    cmd += ["--layer-types-pattern"] * layer_types_pattern
    done = subprocess.run(cmd, env=converter_env(), capture_output=True, text=True)
    if done.returncode == 0:
        return
    lines = (done.stderr or done.stdout).strip().splitlines()
    if done.returncode in (EXIT_TOKENIZER, EXIT_ARCH):
        raise GgufExportError(lines[-1].removeprefix("error: "))
    raise GgufExportError(f"llama.cpp's converter failed on {model_dir}" + (" (projector)" if mmproj else "")
                          + ":\n" + "\n".join(lines[-8:]))


SENTENCEPIECE_MODEL = "tokenizer.model"


def sentencepiece_model(tok_dir: Path, config_dir: Path, family) -> Path | None:
    """The SentencePiece model the converter reads for ``family`` (``GgufSupport.needs_sentencepiece_model``):
    ``tokenizer.model`` beside the tokenizer being exported, else in the base checkpoint (transformers 5
    saves tokenizer.json only, so an adapter's or a merged folder's tokenizer comes without it).
    Refused by name when missing, or when its pieces do not sit at the ids tokenizer.json gives them."""
    if not family.gguf.needs_sentencepiece_model:
        return None
    found = next((d / SENTENCEPIECE_MODEL for d in (tok_dir, config_dir) if (d / SENTENCEPIECE_MODEL).is_file()), None)
    if found is None:
        raise GgufExportError(
            f"{tok_dir}: no {SENTENCEPIECE_MODEL}: llama.cpp's converter reads {family.description}'s vocabulary "
            f"from the SentencePiece model the hub's checkpoints ship beside tokenizer.json (without it, it cannot "
            f"identify the tokenizer); copy {SENTENCEPIECE_MODEL} from the base checkpoint into {tok_dir}")
    if not (tok_dir / "tokenizer.json").is_file():
        return found          # the converter reads tokenizer.model alone
    import sentencepiece

    try:
        spm = sentencepiece.SentencePieceProcessor(model_file=str(found))
    except (OSError, RuntimeError) as e:
        raise GgufExportError(f"{found} is not a SentencePiece model sentencepiece can read ({e})") from e
    vocab = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    moved = [(i, spm.id_to_piece(i), vocab.get(spm.id_to_piece(i))) for i in range(spm.get_piece_size())
             if vocab.get(spm.id_to_piece(i)) != i]
    if moved:
        i, piece, other = moved[0]
        raise GgufExportError(f"{found} does not match {tok_dir / 'tokenizer.json'}: piece {piece!r} is id {i} in the "
                              f"SentencePiece model, {other} in tokenizer.json ({len(moved)} pieces differ); export "
                              "with the tokenizer.model this tokenizer was converted from")
    return found


def preflight(source: str | Path, quant: str, base: str | None = None):
    """Every refusal, before work: returns (is_adapter, config folder, family, SentencePiece model or None)."""
    if quant not in QUANTS:
        raise GgufExportError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    source = Path(source).expanduser()
    is_adapter, config_dir = _source_folders(source, base)
    family = _family(config_dir)
    tok_dir = source if is_adapter and (source / "tokenizer_config.json").is_file() else config_dir
    spm_model = sentencepiece_model(tok_dir, config_dir, family)
    llama_cpp_source()
    if quant == "q4_k_m":
        require_runtime("--quant q4_k_m (llama.cpp's k-quant quantizer)")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.mkdir()
        for f in list(tok_dir.glob("tokenizer*")) + [config_dir / "config.json"] + ([spm_model] if spm_model else []):
            (probe / f.name).write_bytes(f.read_bytes())
        _run_converter(probe, Path(tmp) / "vocab.gguf", "f16", vocab_only=True,
                       layer_types_pattern=family.gguf.layer_types_pattern)
    return is_adapter, config_dir, family, spm_model


def quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's quantizer (the runtime's ``llama_model_quantize``), one thread."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise GgufExportError(f"llama.cpp's quantizer returned {rc} on {src} ({quant})")


def export_gguf(source: str | Path, out: str | Path, *, quant: str = "f16", base: str | None = None,
                overwrite: bool = False, log=None) -> Path:
    """Write the language-model GGUF, the projector GGUF and a Modelfile to ``out``; return ``out``."""
    from vlm.atomic import replacing_folder
    from vlm.export.gguf_clip import write_clip_mmproj
    from vlm.export.gguf_modelfile import modelfile_text

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise GgufExportError(f"{out} already exists: choose another folder or pass --overwrite")
    is_adapter, _config_dir, family, spm_model = preflight(source, quant, base)
    if family.gguf.runtime_caveat:
        log(f"gguf: warning: {family.gguf.runtime_caveat}")
    with tempfile.TemporaryDirectory(prefix="vlm-gguf-") as work_str, replacing_folder(out) as tmp:
        work = Path(work_str)
        model_dir = Path(source).expanduser()
        if is_adapter:
            from vlm.export.merge import export_merged

            log(f"gguf: merging {source} into its base")
            model_dir = export_merged(source, work / "merged", base=base)
            if spm_model is not None and not (model_dir / SENTENCEPIECE_MODEL).is_file():
                (model_dir / SENTENCEPIECE_MODEL).write_bytes(spm_model.read_bytes())   # our work folder
        log(f"gguf: language model ({quant})")
        pattern = family.gguf.layer_types_pattern
        if quant == "q4_k_m":
            _run_converter(model_dir, work / "model-f16.gguf", "f16", layer_types_pattern=pattern)
            quantize(work / "model-f16.gguf", tmp / model_file(quant), quant)
        else:
            _run_converter(model_dir, tmp / model_file(quant), quant, layer_types_pattern=pattern)
        log("gguf: vision projector (f16)")
        if family.gguf.mmproj == "clip_legacy":
            write_clip_mmproj(model_dir, tmp / MMPROJ_FILE, work)
        else:
            _run_converter(model_dir, tmp / MMPROJ_FILE, "f16", mmproj=True, renames=family.gguf.mmproj_renames)
        (tmp / "Modelfile").write_text(modelfile_text(family, model_file(quant), MMPROJ_FILE))
    return out
