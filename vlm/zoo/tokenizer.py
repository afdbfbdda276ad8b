"""Train the zoo's small BPE tokenizers offline, in the style of each family's real tokenizer.

Every family's real tokenizer is a BPE; they differ in how text is split before BPE runs:

- ``qwen2``: byte-level BPE after Qwen2's split regex (digits one by one), NFC normalization.
- ``llama3``: byte-level BPE after Llama 3's split regex (digits in groups of up to three).
- ``tekken``: byte-level BPE after Mistral's Tekken regex (Pixtral).
- ``spm``: SentencePiece-style BPE (LLaVA-1.5's Llama 2 tokenizer): ``▁`` marks word starts,
  unknown characters fall back to byte tokens ``<0x00>``..``<0xFF>`` (ids 3..258, as in Llama 2).

``train_bpe`` returns ``(vocab, merges)``; the builders hand them to the family's own transformers
tokenizer class, so the saved tokenizer is what that class would load for a real checkpoint.
Training is deterministic (fixed corpus, one thread) and takes a few milliseconds.

Gemma's real checkpoints ship a SentencePiece model (``tokenizer.model``) beside ``tokenizer.json``
(transformers' conversion of it), and llama.cpp's converter reads the former: for Gemma 3
``train_sentencepiece_bpe`` trains one with the ``sentencepiece`` library itself, and the
transformers tokenizer is converted from it as for a hub checkpoint (``vlm.zoo.gemma3``).
"""

from __future__ import annotations

import functools
import json
import os

from vlm.errors import VlmError
from vlm.zoo.corpus import corpus_lines

QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
TEKKEN_REGEX = (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
                r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
                r"""|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_REGEXES = {"qwen2": QWEN2_REGEX, "llama3": LLAMA3_REGEX, "tekken": TEKKEN_REGEX}
STYLES = ("qwen2", "llama3", "tekken", "spm")
SPM_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def _byte_level_tokenizer(style: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_REGEXES[style]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    # split=True while training keeps merges inside words, as SentencePiece does.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


@functools.lru_cache(maxsize=None)
def _train(style: str, vocab_size: int, head_specials: tuple[str, ...]) -> str:
    from tokenizers import pre_tokenizers, trainers

    if style not in STYLES:
        raise VlmError(f"tokenizer style {style!r} is not one of {', '.join(STYLES)}")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    if style == "spm":
        tok = _spm_tokenizer()
        specials = list(head_specials) + list(SPM_BYTE_TOKENS)
        alphabet: list[str] = []
    else:
        tok = _byte_level_tokenizer(style)
        specials = list(head_specials)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False, min_frequency=1)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return json.dumps({"vocab": model["vocab"], "merges": model["merges"]})


def train_bpe(style: str, vocab_size: int, head_specials: tuple[str, ...] = ()
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a BPE of ``vocab_size`` entries on the built-in corpus.

    ``head_specials`` take ids ``0..k-1`` (e.g. Llama's ``<unk> <s> </s>``). Returns ``(vocab, merges)``
    with merges as pairs. Raises if the corpus cannot fill ``vocab_size`` (choose a smaller size).
    """
    data = json.loads(_train(style, vocab_size, tuple(head_specials)))
    vocab = data["vocab"]
    if len(vocab) != vocab_size:
        raise VlmError(f"the zoo corpus gives a {style} BPE of {len(vocab)} entries, not {vocab_size}: "
                       f"choose a vocab size <= {len(vocab)}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    return vocab, merges


@functools.lru_cache(maxsize=None)
def train_sentencepiece_bpe(vocab_size: int, meta: tuple[str, str, str, str],
                            user_defined: tuple[str, ...]) -> bytes:
    """A SentencePiece BPE model (the serialized ``ModelProto`` of a ``tokenizer.model``) of
    ``vocab_size`` pieces, trained by the ``sentencepiece`` library on the built-in corpus with
    Gemma's settings: no normalization and no dummy prefix (spaces only become ``▁``), whitespace
    runs may be pieces, digits split one by one, unknown characters fall back to byte pieces.

    Ids: ``meta`` = (pad, eos, bos, unk) at 0..3 (Gemma's order), then ``user_defined`` (pieces
    matched whole wherever they appear in text, as added tokens are in transformers), then the 256
    byte pieces ``<0x00>``..``<0xFF>``, then the merges in the order SentencePiece learned them
    (score −rank: the encoder applies the highest score first), then the corpus' characters."""
    import io

    import sentencepiece as spm

    pad, eos, bos, unk = meta
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=pad, eos_piece=eos, bos_piece=bos, unk_piece=unk,
        user_defined_symbols=list(user_defined), byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=True, num_threads=1,
        minloglevel=2)
    return model.getvalue()


def check_special_ids(tokenizer, expected: dict[str, int], length: int) -> None:
    """Fail loudly if a special token did not land on the id the model config names, or if the
    tokenizer's length is not ``length`` (ids past the tokenizer would decode to empty text)."""
    for token, want in expected.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise VlmError(f"zoo tokenizer: {token!r} has id {got}, the model config expects {want}")
    if len(tokenizer) != length:
        raise VlmError(f"zoo tokenizer has {len(tokenizer)} tokens, expected {length}")


def byte_level_backend(style: str, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                       specials: tuple[str, ...] = (), bos: str | None = None):
    """A ``tokenizers.Tokenizer`` for a trained byte-level BPE, for families whose real checkpoint
    ships a plain ``tokenizer.json`` (Pixtral, Llama 3). ``specials`` (already in ``vocab``) are
    marked special; those missing from ``vocab`` are appended after it, in order. With ``bos`` every
    encoded sequence starts with it, as those tokenizers do."""
    from tokenizers import AddedToken, models, processors

    tok = _byte_level_tokenizer(style)
    tok.model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok
