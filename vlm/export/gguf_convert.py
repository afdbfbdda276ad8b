"""Run llama.cpp's ``convert_hf_to_gguf`` on one checkpoint folder (a subprocess entry point).

``python -m vlm.export.gguf_convert MODEL_DIR OUT.gguf --outtype f16 [--mmproj] [--vocab-only]``,
with ``PYTHONPATH`` from :func:`vlm.export.gguf_toolchain.converter_env` (the converter's folder and
its ``gguf-py``). It does what the converter's ``main()`` does for a local folder, with two changes,
made by subclassing the converter's model classes: the BPE pre-tokenizer (below), and, for the
Pixtral projector, the ``[IMG_BREAK]`` embedding row (:func:`with_img_break_embedding`).

The converter names a byte-level BPE's pre-tokenizer (``tokenizer.ggml.pre``, which selects
llama.cpp's split regex) by hashing the token ids of a probe text, so only tokenizers with the exact
vocabulary of a model it knows pass. A tokenizer with a known split regex but its own vocabulary
(a retrained or extended tokenizer, the zoo's) is refused although llama.cpp runs it correctly. When
the hash is unknown we name the pre-tokenizer from the split regex written in ``tokenizer.json``,
only for regexes equal character for character to one llama.cpp implements; anything else stays an
error that says what was found. Run in a subprocess: the converter configures logging and keeps
module state, and its memory is returned when it exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm.zoo.tokenizer import LLAMA3_REGEX, QWEN2_REGEX, TEKKEN_REGEX

# split regex (as tokenizer.json writes it) -> llama.cpp's pre-tokenizer name (llama-vocab.cpp)
PRE_TOKENIZER_BY_REGEX = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe", TEKKEN_REGEX: "tekken"}
EXIT_TOKENIZER = 4
EXIT_ARCH = 5


class TokenizerNotConvertible(Exception):
    pass


def split_regex(model_dir: Path) -> str | None:
    """The regex of the byte-level BPE's ``Split`` pre-tokenizer in ``tokenizer.json``, if any."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split" and isinstance(step.get("pattern"), dict):
            return step["pattern"].get("Regex")
    return None


def pre_tokenizer_from_regex(model_dir: Path) -> str:
    regex = split_regex(model_dir)
    if regex in PRE_TOKENIZER_BY_REGEX:
        return PRE_TOKENIZER_BY_REGEX[regex]
    found = "no Split regex" if regex is None else f"split regex {regex[:80]!r}"
    raise TokenizerNotConvertible(
        f"{model_dir / 'tokenizer.json'}: llama.cpp's converter does not recognise this BPE tokenizer "
        f"(its probe hash is unknown) and its pre-tokenizer ({found}) is none of those llama.cpp "
        f"implements that we can name ({', '.join(sorted(PRE_TOKENIZER_BY_REGEX.values()))}); "
        "export the base model's own tokenizer, or a llama.cpp release that knows this one")


def with_regex_fallback(model_class: type) -> type:
    """``model_class`` whose pre-tokenizer lookup falls back to the tokenizer.json split regex."""

    class WithRegexFallback(model_class):  # type: ignore[misc, valid-type]
        model_arch = model_class.model_arch

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                return pre_tokenizer_from_regex(Path(self.dir_model))

    WithRegexFallback.__name__ = model_class.__name__
    return WithRegexFallback


def with_img_break_embedding(model_class: type) -> type:
    """``model_class`` (a projector converter that writes Pixtral's ``[IMG_BREAK]`` embedding row)
    that lets the language model's embedding table through its tensor filter.

    The projector converter skips every tensor named ``language_model.*`` before its own code looks
    for the embedding table it takes the ``[IMG_BREAK]`` row from; with transformers' names
    (``language_model.model.embed_tokens.weight`` as saved) it never sees the table and writes a
    projector without ``v.token_embd.img_break``, which mtmd refuses to load. Only that one tensor
    is let through; its ``modify_tensors`` keeps the row and drops the rest of the table."""

    class WithImgBreakEmbedding(model_class):  # type: ignore[misc, valid-type]
        @classmethod
        def filter_tensors(cls, item):
            name = item[0]
            if "language_model." in name and name.endswith("embed_tokens.weight"):
                return item
            return super().filter_tensors(item)

    WithImgBreakEmbedding.__name__ = model_class.__name__
    return WithImgBreakEmbedding


def convert(model_dir: Path, out: Path, outtype: str, *, mmproj: bool = False, vocab_only: bool = False) -> Path:
    import gguf  # the converter's own gguf-py (first on PYTHONPATH)
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "auto": gguf.LlamaFileType.GUESSED}
    model_type = ModelType.MMPROJ if mmproj else ModelType.TEXT
    hparams = ModelBase.load_hparams(model_dir, False)
    arch = get_model_architecture(hparams, model_type)
    cls = get_model_class(arch, mmproj=mmproj)
    cls = with_img_break_embedding(cls) if mmproj and hasattr(cls, "img_break_tok_id") else with_regex_fallback(cls)
    with torch.inference_mode():
        model = cls(model_dir, ftypes[outtype], out, eager=False, dry_run=False)
        inner = getattr(model, "impl", None)   # a dispatching class (Mistral3) hands the work to `impl`
        if not mmproj and inner is not None and hasattr(inner, "get_vocab_base_pre"):
            inner.__class__ = with_regex_fallback(type(inner))
        if vocab_only:
            model.write_vocab()
        else:
            model.write()
    return Path(model.fname_out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "auto"])
    ap.add_argument("--mmproj", action="store_true")
    ap.add_argument("--vocab-only", action="store_true")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        out = convert(args.model_dir, args.out, args.outtype, mmproj=args.mmproj, vocab_only=args.vocab_only)
    except TokenizerNotConvertible as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TOKENIZER
    except NotImplementedError as e:
        print(f"error: llama.cpp's converter: {e}", file=sys.stderr)
        return EXIT_ARCH
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
