"""Render a conversation with the processor's chat template and find which characters train.

Messages are shaped for the family's template first (:func:`chat_messages`): by the family's own
``shape_messages`` (Pixtral: the system prompt as text in the last user turn, where its template
puts it at inference), and with the family's end-of-turn token
appended to each reply where the checkpoint's template writes none (LLaVA-1.5), because a model that
is never trained on its end-of-turn token never learns to stop.

Spans, linear in the number of turns: every assistant reply is wrapped in two private-use marker
characters and the conversation is rendered once more. If removing the markers gives back exactly
the plain rendering, the template treated the markers as text, so their positions are the replies'
positions; each span runs from the end of the generation prompt before the reply through the
end-of-turn token after it. A template that reacts to the markers (it trims or rewrites reply text)
falls back to prefix rendering: for assistant turn *k*, ``render(turns[:k],
add_generation_prompt=True)`` ends where the answer starts and ``render(turns[:k+1])`` ends where the
turn ends (its end-of-turn token included, trailing whitespace excluded); that costs one rendering
per turn of a growing prefix (quadratic), and a template for which prefixes are not prefixes of the
whole is reported, not guessed around. Both give the same labels on every zoo family (tested).

Template failures on a record (a template that raises on an odd role order, say) become
``template_refused`` :class:`DataError`s, so a skip policy counts them.
"""

from __future__ import annotations

import copy
import re

from vlm.data_formats import problems
from vlm.data_formats.conversation import Conversation
from vlm.errors import ConfigError, DataError

TRAIN_ON = ("assistant", "last_assistant", "all")


def adds_bos(tokenizer, text: str) -> bool:
    """Whether tokenizing rendered chat ``text`` should add the tokenizer's special tokens: not when
    the template wrote the BOS itself (Mistral, Pixtral, LLaVA, Gemma, Llama templates do), else the
    model reads two. The rule of ``processor.apply_chat_template(tokenize=True)``, for code that
    renders the text first and tokenizes it after."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos is not None and text.startswith(bos))
OPEN, CLOSE = "\ue000", "\ue001"      # private-use characters: no template or tokenizer gives them meaning
PROBE = "vlm-probe-reply"


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return processor.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raises anything; the record is what is wrong
        raise DataError(f"the model's chat template refuses this conversation ({type(e).__name__}: "
                        f"{e})", code=problems.TEMPLATE_REFUSED) from None


def end_of_turn_to_append(processor, family) -> str | None:
    """The family's end-of-turn token when the checkpoint's template writes none after a reply."""
    eot = getattr(family, "end_of_turn", "") or ""
    if not eot:
        return None
    probe = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": PROBE}]}]
    try:
        text = processor.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: nothing to learn here
        return None
    after = text[text.rindex(PROBE) + len(PROBE):]
    return None if after.lstrip().startswith(eot) else eot


def generation_prompt(processor) -> str:
    """What ``add_generation_prompt=True`` adds after a user turn ("<|im_start|>assistant\\n",
    "ASSISTANT:"); "" when the template adds nothing or cannot say."""
    user = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    try:
        plain = processor.apply_chat_template(user, tokenize=False)
        prompted = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001
        return ""
    return prompted[len(plain):] if prompted.startswith(plain) else ""


def chat_messages(conv: Conversation, family=None, append_end_of_turn: str | None = None) -> list[dict]:
    """``conv.to_messages()`` shaped for the family's template (see the module docstring)."""
    messages = conv.to_messages()
    for m in messages:
        if m["role"] == "assistant" and append_end_of_turn:
            texts = [c for c in m["content"] if c["type"] == "text"]
            if texts:
                texts[-1]["text"] += append_end_of_turn
            else:
                m["content"].append({"type": "text", "text": append_end_of_turn})
    shape = getattr(family, "shape_messages", None)
    return shape(messages) if shape is not None else messages


def trainable_char_spans(processor, conv: Conversation, train_on: str = "assistant", *, family=None,
                         append_end_of_turn: str | None = None,
                         prompt: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """``(full_text, [(start, end), ...])``: character spans whose tokens get labels."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    messages = chat_messages(conv, family, append_end_of_turn)
    full = render(processor, messages)
    if train_on == "all":
        return full, [(0, len(full))]
    # assistant messages after shaping (shaping keeps them, in order), less the context-only ones
    trains = [t.trainable for t in conv.turns if t.role == "assistant"]
    turns = [i for i, ok in zip((i for i, m in enumerate(messages) if m["role"] == "assistant"), trains)
             if ok]
    if train_on == "last_assistant":
        turns = turns[-1:]
    eot = getattr(family, "end_of_turn", "") or ""
    if prompt is None and eot:
        prompt = generation_prompt(processor)
    spans = _marked_spans(processor, messages, turns, full, eot, prompt or "") if eot else None
    if spans is None:
        spans = _prefix_spans(processor, messages, turns, full, conv)
    return full, spans


def _marked_spans(processor, messages, turns, full: str, eot: str,
                  prompt: str) -> list[tuple[int, int]] | None:
    """One extra rendering with markers around the replies; None if the template reacted to them.

    A span starts where the generation prompt ends (text the template writes between the prompt
    and the reply, LLaVA's " ", is generated by the model too, so it trains), and ends after the
    end-of-turn token that follows the reply."""
    if OPEN in full or CLOSE in full:
        return None
    marked_messages = copy.deepcopy(messages)
    for k in turns:
        content = marked_messages[k]["content"]
        if isinstance(content, str):
            marked_messages[k]["content"] = OPEN + content + CLOSE
            continue
        texts = [c for c in content if c["type"] == "text"]
        if not texts:
            return None
        texts[0]["text"] = OPEN + texts[0]["text"]
        texts[-1]["text"] += CLOSE
    marked = render(processor, marked_messages)
    if marked.replace(OPEN, "").replace(CLOSE, "") != full:
        return None
    spans, removed, start = [], 0, None
    for m in re.finditer(f"[{OPEN}{CLOSE}]", marked):
        at = m.start() - removed
        removed += 1
        if m.group() == OPEN:
            if start is not None:
                return None
            start = at
            cut = full.rfind(prompt, 0, at) if prompt else -1
            if cut >= 0 and not full[cut + len(prompt):at].strip():
                start = cut + len(prompt)
        else:
            if start is None:
                return None
            closing = re.match(r"\s*" + re.escape(eot), full[at:])
            spans.append((start, at + (closing.end() if closing else 0)))
            start = None
    return spans if len(spans) == len(turns) and start is None else None


def _prefix_spans(processor, messages, turns, full: str, conv: Conversation) -> list[tuple[int, int]]:
    spans = []
    for k in turns:
        head = render(processor, messages[:k], add_generation_prompt=True)
        upto = render(processor, messages[:k + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            raise DataError(f"the chat template does not render this conversation prefix by prefix "
                            f"(turn {k}); labels cannot be placed reliably with this template",
                            code=problems.TEMPLATE_REFUSED)
        end = len(upto.rstrip())
        if end > len(head):
            spans.append((len(head), end))
    return spans


def token_flags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (character offsets), does it overlap a trainable span?

    One pass over both (offsets ascend, spans are disjoint): span ``j`` is the first that ends after
    the token starts; the token overlaps a span iff it overlaps that one."""
    spans = sorted(spans)
    flags, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        flags.append(end > start and j < len(spans) and spans[j][0] < end)
    return flags
