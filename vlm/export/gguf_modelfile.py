"""The Ollama ``Modelfile`` written beside the two GGUF files.

``ollama create NAME -f OUT/Modelfile`` reads it as is: the first ``FROM`` is the language model,
the second the vision projector (Ollama tells them apart by the projector's ``clip`` architecture);
the chat template (Go template syntax) and stop strings come from the family record, since Ollama
does not run the Jinja template the GGUF also carries. Paths are relative to the folder, so the
folder can be moved or copied whole. Greedy decoding (temperature 0), as the export was verified.
"""

from __future__ import annotations

from vlm.families.base import Family


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError(f"an Ollama template cannot contain triple quotes: {text!r}")
    return f'"""{text}"""'


def modelfile_text(family: Family, model_file: str, mmproj_file: str) -> str:
    gguf = family.gguf
    assert gguf is not None, f"family {family.name} has no GGUF support"
    lines = [f"# {family.description}: written by `vlm export --gguf`",
             f"FROM ./{model_file}", f"FROM ./{mmproj_file}",
             f"TEMPLATE {_quoted(gguf.ollama_template)}"]
    lines += [f'PARAMETER stop "{s}"' for s in gguf.stop]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
