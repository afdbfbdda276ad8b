"""What a new user meets around a training run: warnings from the LoRA setup reach them (and the
run still saves its adapter), the output folder is checked before the model loads, and files are
created with the user's umask."""

from __future__ import annotations

import stat
import warnings

import pytest

from vlm.atomic import current_umask

from .._tmpfs import needs_mount, run_on_tmpfs
from ._tiny_run import write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm.data_formats.synthetic import generate

    return generate(tmp_path_factory.mktemp("data"), n=8, seed=2)


def _cfg(root, tiny_checkpoint, data, **kw):
    from vlm.train.config import load_config

    root.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(root, tiny_checkpoint("qwen2_vl"), data.sharegpt_json,
                                    max_steps=kw.pop("max_steps", 2), save_steps=kw.pop("save_steps", 2), **kw))


def test_lora_setup_warnings_are_shown_and_the_run_saves(tmp_path, tiny_checkpoint, data, capsys):
    """modules_to_save makes apply_lora warn for vLLM, and PEFT warns about the tied lm_head: the run
    must finish and save, print the first and pass the second on."""
    from vlm.train.recipe import train

    cfg = _cfg(tmp_path, tiny_checkpoint, data,
               extra={"lora.modules_to_save": ["lm_head"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg, progress=False)
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.output_dir / "summary.json").is_file()
    # readable by a server running as another user, as the umask allows
    umask = current_umask()
    for path, kind in ((result.adapter_dir, 0o777), (result.adapter_dir / "vlmtune.json", 0o666),
                       (result.output_dir / "summary.json", 0o666)):
        assert stat.S_IMODE(path.stat().st_mode) == kind & ~umask, path
    assert "warning: vLLM serving: modules_to_save (lm_head)" in capsys.readouterr().out
    # PEFT's own warning from the LoRA setup is re-emitted, not swallowed
    assert any("tie_word_embeddings" in str(w.message) and "peft" in w.filename for w in caught), \
        [(w.filename, str(w.message)[:80]) for w in caught]


@needs_mount
def test_read_only_output_is_refused_before_the_model_loads(tmp_path, tiny_checkpoint, data):
    mnt = tmp_path / "ro"
    cfg = write_config(tmp_path, tmp_path / "no-such-model", data.sharegpt_json, max_steps=2, save_steps=2,
                       extra={"output": str(mnt / "run")})
    r = run_on_tmpfs(mnt, "ro,size=64k", f"""
        import sys
        from vlm.cli.main import main
        sys.exit(main(["train", "{cfg}"]))
    """)
    assert r.returncode == 1, r.stderr[-2000:]
    # the model path does not exist either: the output folder is checked first
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot create the output folder {mnt}/run: the file system is read-only"


@needs_mount
def test_full_disk_at_the_first_checkpoint_names_it(tmp_path, tiny_checkpoint, data):
    mnt = tmp_path / "small"
    cfg = write_config(tmp_path, tiny_checkpoint("qwen2_vl"), data.sharegpt_json, max_steps=2, save_steps=1,
                       extra={"output": str(mnt / "run")})
    r = run_on_tmpfs(mnt, "size=160k", f"""
        import sys
        from vlm.cli.main import main
        sys.exit(main(["train", "{cfg}"]))
    """, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot save {mnt}/run/checkpoint-1: the disk is full"
