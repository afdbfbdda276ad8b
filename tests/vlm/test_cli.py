"""The `vlm` command: subcommands listed, each with help, errors are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlm.cli.main import SUBCOMMANDS, main
from vlm.zoo import VARIANTS

REPO = Path(__file__).resolve().parents[2]
VLM = [sys.executable, "-m", "vlm"]


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*VLM, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_all_eight_subcommands():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    expected = ("train", "eval", "quant-report", "data", "serve", "export", "zoo", "demo")
    assert tuple(SUBCOMMANDS) == expected
    for name in expected:
        assert f"    {name}" in result.stdout, name


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage: vlm " + name in capsys.readouterr().out


def test_error_is_one_line_without_traceback(tmp_path):
    result = _run("zoo", "tiny", "gpt2", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: unknown zoo variant 'gpt2'; available: "
                                     + ", ".join(VARIANTS))
    debug = _run("--debug", "zoo", "tiny", "gpt2", str(tmp_path / "x"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_zoo_list_and_tiny(tmp_path, capsys):
    assert main(["zoo", "list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(VARIANTS)
    assert main(["zoo", "tiny", "pixtral", str(tmp_path / "px"), "--seed", "2"]) == 0
    assert "wrote tiny pixtral checkpoint (seed 2" in capsys.readouterr().out
    assert (tmp_path / "px" / "model.safetensors").is_file()


# Heavy packages a subcommand imports only when it runs (`vlm --help`, `vlm data`, argument errors
# stay instant; `vlm train` imports them once, inside the recipe, where its startup clock times them).
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pandas", "numpy", "PIL",
         "triton", "safetensors", "vllm", "gguf", "open_clip", "matplotlib", "scipy", "sklearn", "sacrebleu",
         "pycocoevalcap")


def test_building_the_cli_imports_no_heavy_package():
    code = ("import sys, vlm.cli.main as m; m.build_parser(); "
            "print(' '.join(sorted({k.split('.')[0] for k in sys.modules})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = set(r.stdout.split())
    assert "vlm" in loaded and not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
