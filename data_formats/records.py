"""Raw record (a dict from any source) -> validated-structure :class:`Conversation`.

Detects the record format (``conversations`` = LLaVA/ShareGPT, ``messages`` = OpenAI style), parses
it, checks the structure every format shares (not empty, has an assistant turn) and stamps the
location (file, record index, id) on the result and on every error.
"""

from __future__ import annotations

from typing import Any

from vlm.data_formats import problems
from vlm.data_formats.conversation import Conversation
from vlm.data_formats.messages import parse_messages
from vlm.data_formats.sharegpt import parse_sharegpt
from vlm.errors import DataError


def record_id_of(raw: Any) -> str | None:
    if isinstance(raw, dict) and raw.get("id") is not None and not isinstance(raw.get("id"), (dict, list)):
        return str(raw["id"])
    return None


def located(err: DataError, *, source: str | None, index: int | None, record_id: str | None) -> DataError:
    """A copy of ``err`` that names where it happened (keeps what it already named)."""
    return DataError(err.problem, file=err.file or source, index=err.index if err.index is not None else index,
                     record_id=err.record_id or record_id, code=err.code)


def check_structure(conv: Conversation) -> None:
    """Problems shared by every format: nothing to read, nothing to learn, or something that would
    be learnt wrong (an empty reply teaches the model to stop at once; an image inside a reply makes
    the vision markers trained tokens; an assistant speaking first has no prompt to answer)."""
    if not conv.turns:
        raise DataError("the conversation is empty", code=problems.EMPTY_CONVERSATION)
    if not conv.assistant_turn_indices():
        raise DataError(f"no assistant turn (roles: {', '.join(conv.roles())})",
                        code=problems.NO_ASSISTANT_TURN)
    first = next(t.role for t in conv.turns if t.role != "system")
    if first != "user":
        raise DataError(f"the assistant speaks first (roles: {', '.join(conv.roles())}): a reply "
                        "needs a user turn before it", code=problems.TURN_ORDER)
    for i, turn in enumerate(conv.turns):
        if turn.role != "assistant":
            continue
        if any(not isinstance(p, str) for p in turn.parts):
            raise DataError(f"turn {i} (assistant) holds an image or video: they belong in user turns "
                            "(the model would be trained to write vision markers)",
                            code=problems.IMAGE_IN_REPLY)
        if not turn.text.strip():
            raise DataError(f"turn {i} (assistant) is empty or whitespace only: nothing to learn but "
                            "stopping at once", code=problems.EMPTY_REPLY)


def parse_prompt_completion(raw: dict) -> Conversation:
    """TRL's prompt-completion layout: ``prompt`` and ``completion`` (message lists, or strings for a
    user prompt and an assistant completion). As in TRL, only the completion trains: assistant turns
    inside the prompt are context."""
    def as_messages(value, role):
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    prompt, completion = as_messages(raw["prompt"], "user"), as_messages(raw["completion"], "assistant")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, list):
            raise DataError(f"'{name}' must be a list of messages or a string, got {type(value).__name__}",
                            code=problems.WRONG_TYPE)
    conv = parse_messages({**raw, "messages": prompt + completion})
    context = len(conv.turns) - len(completion)   # a top-level system column comes first
    for turn in conv.turns[:context]:
        turn.trainable = False
    return conv


def parse_record(raw: Any, *, source: str | None = None, index: int | None = None,
                 image_root: str | None = None) -> Conversation:
    """Parse one record of either format; every error names ``source``, ``index`` and the id."""
    rid = record_id_of(raw)
    try:
        if not isinstance(raw, dict):
            raise DataError(f"a record must be a JSON object, got {type(raw).__name__}",
                            code=problems.WRONG_TYPE)
        if "conversations" in raw:
            conv = parse_sharegpt(raw)
        elif "messages" in raw:
            conv = parse_messages(raw)
        elif "prompt" in raw and "completion" in raw:
            conv = parse_prompt_completion(raw)
        else:
            keys = ", ".join(sorted(map(str, raw))[:8]) or "none"
            raise DataError(f"neither 'conversations' (LLaVA/ShareGPT), 'messages' (OpenAI) nor "
                            f"'prompt' + 'completion' (TRL) in the record (keys: {keys})",
                            code=problems.UNKNOWN_FORMAT)
        check_structure(conv)
    except DataError as e:
        raise located(e, source=source, index=index, record_id=rid) from None
    conv.record_id, conv.source, conv.index, conv.image_root = rid, source, index, image_root
    return conv
