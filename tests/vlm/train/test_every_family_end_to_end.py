"""Every zoo family through the user's path, as the CLI runs it: `vlm train` a few LoRA steps on
synthetic image-caption data (kernels on, under the Triton interpreter), `vlm export --check-vllm`,
`vlm export --merged --verify` (merged logits equal base+adapter), then `vlm eval` of the adapter on
a few images. Follows the zoo's registry."""

from __future__ import annotations

import json

import pytest

from vlm.cli.main import main
from vlm.zoo import VARIANTS

from ._tiny_run import write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm.data_formats.synthetic import generate

    return generate(tmp_path_factory.mktemp("data"), n=6, seed=4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_export_eval(tmp_path, tiny_checkpoint, data, variant, capsys):
    base = tiny_checkpoint(variant)
    cfg = write_config(tmp_path, base, data.sharegpt_json, max_steps=2, save_steps=2, batch_size=2,
                       extra={"kernels": True, "data.max_length": 256})
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file(), out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary, out
    assert main(["export", str(adapter), "--check-vllm"]) == 0, capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["export", str(adapter), "--merged", str(merged), "--verify"]) == 0, capsys.readouterr()
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and (merged / "model.safetensors").is_file()
    rc = main(["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(data.sharegpt_json),
               "--out", str(tmp_path / "eval"), "--limit", "2", "--max-new-tokens", "4", "--device", "cpu",
               "--no-meteor"])
    assert rc == 0, capsys.readouterr()
