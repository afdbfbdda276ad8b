"""Run llama.cpp's ``convert_hf_to_gguf`` on one checkpoint folder (a subprocess entry point).

``python -m vlm.export.gguf_convert MODEL_DIR OUT.gguf --outtype f16 [--mmproj] [--vocab-only]``,
with ``PYTHONPATH`` from :func:`vlm.export.gguf_toolchain.converter_env` (the converter's folder and
its ``gguf-py``). It does what the converter's ``main()`` does for a local folder, with two changes,
made by subclassing the converter's model classes: the BPE pre-tokenizer (below), for the
Pixtral projector the ``[IMG_BREAK]`` embedding row (:func:`with_img_break_embedding`), and tensor
name prefixes the family record says transformers saves differently from the hub's checkpoints
(``--rename-prefix``, :func:`with_renamed_prefixes`); and, for a SentencePiece vocabulary, the added
tokens' types from ``tokenizer.json`` (:func:`with_added_token_types`); for Gemma 3, the layers'
sliding/full pattern from the config (``--layer-types-pattern``, :func:`with_layer_types_pattern`).

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


def with_renamed_prefixes(model_class: type, renames: tuple[tuple[str, str], ...]) -> type:
    """``model_class`` that reads a tensor named ``old…`` as ``new…`` for each (old, new) in
    ``renames`` (names already starting with ``new`` are left alone). Gemma 3: transformers 5.19
    saves the SigLIP tower as ``vision_tower.embeddings…``, the hub's checkpoints (and so the
    converter's tensor map) have ``vision_tower.vision_model.embeddings…``."""

    class WithRenamedPrefixes(model_class):  # type: ignore[misc, valid-type]
        if hasattr(model_class, "model_arch"):
            model_arch = model_class.model_arch

        @classmethod
        def filter_tensors(cls, item):
            name, gen = item
            for old, new in renames:
                if name.startswith(old) and not name.startswith(new):
                    name = new + name[len(old):]
                    break
            return super().filter_tensors((name, gen))

    WithRenamedPrefixes.__name__ = model_class.__name__
    return WithRenamedPrefixes


def with_added_token_types(model_class: type) -> type:
    """``model_class`` whose SentencePiece vocabulary takes its added tokens from ``tokenizer.json``
    where ``tokenizer_config.json`` lists none.

    The converter reads a SentencePiece model's pieces with their SentencePiece types (user-defined
    pieces, Gemma's ``<start_of_turn>`` among them, come out as normal text pieces), then marks the
    added tokens listed in ``tokenizer_config.json``'s ``added_tokens_decoder`` — special ones as
    control tokens, the rest as user-defined (always matched whole). transformers 4 wrote that list;
    transformers 5 writes the added tokens to ``tokenizer.json`` only, so a checkpoint it saved
    (a merged export, the zoo's) would reach llama.cpp with its turn markers as plain pieces, which
    its tokenizer never matches in text. The same marking, from ``tokenizer.json``."""

    class WithAddedTokenTypes(model_class):  # type: ignore[misc, valid-type]
        model_arch = model_class.model_arch

        def _create_vocab_sentencepiece(self):
            from conversion.base import SentencePieceTokenTypes

            tokens, scores, toktypes = super()._create_vocab_sentencepiece()
            config = Path(self.dir_model) / "tokenizer_config.json"
            tok_json = Path(self.dir_model) / "tokenizer.json"
            if not tok_json.is_file() or (config.is_file()
                                           and json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder")):
                return tokens, scores, toktypes
            for added in json.loads(tok_json.read_text(encoding="utf-8")).get("added_tokens", []):
                token_id, content = int(added["id"]), added["content"]
                if token_id >= len(tokens):
                    continue
                special = added.get("special") or self.does_token_look_special(content)
                tokens[token_id] = (content if special else content.replace("\u2581", " ")).encode("utf-8")
                toktypes[token_id] = SentencePieceTokenTypes.CONTROL if special else SentencePieceTokenTypes.USER_DEFINED
                scores[token_id] = -1000.0
            return tokens, scores, toktypes

    WithAddedTokenTypes.__name__ = model_class.__name__
    return WithAddedTokenTypes


def with_layer_types_pattern(model_class: type) -> type:
    """``model_class`` that writes which layers use sliding-window attention (``layer_types`` of
    the config) and the sliding layers' RoPE base, instead of leaving llama.cpp to its defaults.

    The converter writes Gemma 3's window size but not its pattern; llama.cpp then assumes the
    real checkpoints' 5 sliding : 1 full (every 6th layer full) with RoPE base 10k on sliding
    layers. A config with another pattern (the zoo's 1 : 1) would run its full-attention layers as
    sliding ones with the local RoPE base: wrong logits from a file that loads without a word."""

    class WithLayerTypesPattern(model_class):  # type: ignore[misc, valid-type]
        model_arch = model_class.model_arch

        def set_gguf_parameters(self):
            super().set_gguf_parameters()
            layer_types = self.hparams.get("layer_types")
            if layer_types:
                self.gguf_writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            local = (self.rope_parameters.get("sliding_attention") or {}).get("rope_theta")
            if local:
                self.gguf_writer.add_rope_freq_base_swa(float(local))

    WithLayerTypesPattern.__name__ = model_class.__name__
    return WithLayerTypesPattern


def convert(model_dir: Path, out: Path, outtype: str, *, mmproj: bool = False, vocab_only: bool = False,
            renames: tuple[tuple[str, str], ...] = (), layer_types_pattern: bool = False) -> Path:
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
    if renames:
        cls = with_renamed_prefixes(cls, renames)
    if not mmproj and (model_dir / "tokenizer.model").is_file():
        cls = with_added_token_types(cls)
    if not mmproj and layer_types_pattern:
        cls = with_layer_types_pattern(cls)
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
    ap.add_argument("--rename-prefix", nargs=2, action="append", default=[], metavar=("OLD", "NEW"))
    ap.add_argument("--layer-types-pattern", action="store_true")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        out = convert(args.model_dir, args.out, args.outtype, mmproj=args.mmproj, vocab_only=args.vocab_only,
                      renames=tuple(tuple(r) for r in args.rename_prefix),
                      layer_types_pattern=args.layer_types_pattern)
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
