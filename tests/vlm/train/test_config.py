"""Training config validation: unknown keys name the closest valid key, bad values the allowed ones."""

from pathlib import Path

import pytest

from vlm.errors import ConfigError
from vlm.train.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[3]
MINIMAL = {"model": "some/model", "data": {"train": ["train.jsonl"]}}


def test_minimal_config_and_overrides():
    cfg = parse_config(dict(MINIMAL), ["training.lr=1e-4", "lora.r=8", "data.max_length=512",
                                       "lora.targets=[language.mlp]"])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.lora.r == 8 and cfg.lora.targets == ["language.mlp"]
    assert cfg.data.max_length == 512
    assert cfg.data.train[0].path == "train.jsonl" and cfg.data.train[0].weight == 1.0


@pytest.mark.parametrize("data, message", [
    ({**MINIMAL, "trainig": {}}, "unknown key 'trainig'; did you mean 'training'?"),
    ({**MINIMAL, "lora": {"rank": 8}}, "unknown key 'lora.rank'"),
    ({**MINIMAL, "training": {"optimizer": "adam8"}}, "training.optimizer: 'adam8' is not allowed; choose one of"),
    ({**MINIMAL, "training": {"lr": "fast"}}, "training.lr: expected a number"),
    ({**MINIMAL, "training": {"batch_size": 2.5}}, "training.batch_size: expected an integer"),
    ({**MINIMAL, "data": {"train": ["a"], "overlong": "cut"}}, "data.overlong: 'cut' is not allowed"),
    ({**MINIMAL, "training": {"save_total_limit": 1}}, "save_total_limit: must be >= 2"),
    ({**MINIMAL, "training": {"mlp_chunks": 0}}, "training.mlp_chunks: must be >= 1"),
    ({**MINIMAL, "training": {"compile": False, "cuda_graphs": True}}, "training.cuda_graphs: replays compiled"),
    ({**MINIMAL, "training": {"mlp_chunks": "auto"}}, "training.mlp_chunks"),
    ({"model": "m", "data": {}}, "data.train: give at least one data file"),
    ({**MINIMAL, "data": {"train": ["a"], "max_tokens_per_batch": 1024}}, "data.max_tokens_per_batch: 1024 is below max_length 2048"),
    ({**MINIMAL, "data": {"train": ["a"], "packing": True}}, "data.packing: true needs data.max_tokens_per_batch"),
    ({**MINIMAL, "data": {"train": ["a"], "num_workers": "many"}}, "data.num_workers: auto or an integer"),
    ({**MINIMAL, "data": {"train": ["a"], "num_workers": -1}}, "data.num_workers: auto or an integer"),
    ({**MINIMAL, "data": {"train": ["a"], "length_buckets": 0}}, "data.length_buckets: must be >= 1"),
    ({"data": {"train": ["a"]}}, "missing required key(s): model"),
    # training.train_vision means something for method: full only (vlm.train.modes)
    ({**MINIMAL, "training": {"train_vision": True}}, "training.train_vision: applies to method: full"),
    # keys that were accepted and then ignored are unknown now
    ({**MINIMAL, "data": {"train": ["a"], "eval": ["b"]}}, "unknown key 'data.eval'"),
    ({**MINIMAL, "data": {"train": [{"path": "a", "format": "sharegpt"}]}}, "unknown key 'data.train[0].format'"),
    # the quantization policy is checked with the rest of the config
    ({**MINIMAL, "quant": "nf5"}, "quant: unknown preset 'nf5'"),
    ({**MINIMAL, "quant": {"components": {"vision": "int3"}}}, "unknown precision 'int3'"),
    ({**MINIMAL, "quant": {"preset": "dynamic", "budgte": 0.1}}, "quant: unknown key 'budgte'"),
])
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert message in str(e.value)


def test_bad_quant_fails_before_the_output_folder_exists(tmp_path, capsys):
    from vlm.cli.main import main

    cfg = tmp_path / "c.yaml"
    out = tmp_path / "run"
    cfg.write_text(f"model: {tmp_path / 'no-model'}\ndata: {{train: [{tmp_path / 'd.jsonl'}]}}\n"
                   f"output: {out}\nquant: {{budget: 2.5}}\n")
    assert main(["train", str(cfg)]) == 1
    assert "quant.budget" in capsys.readouterr().err
    assert not out.exists()
    for good in ("nf4", "dynamic", "bf16", "none"):
        assert parse_config(dict(MINIMAL), [f"quant={good}"]).quant == good


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_config(dict(MINIMAL), ["training.lr"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_parse_and_say_how_to_run(name):
    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.lora.r >= 1 and cfg.training.lr > 0
    header = path.read_text().splitlines()[:4]
    assert any(f"vlm train configs/{name}.yaml" in line or "vlm demo" in line for line in header)
