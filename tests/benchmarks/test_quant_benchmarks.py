"""benchmarks/quant_policies.py and quant_skip_cost.py end to end on CPU (--tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def test_quant_policies_tiny(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quant_policies.py"), "--tiny",
                        "--device", "cpu", "--out", str(tmp_path)], env=ENV, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "quant_policies.json").read_text())
    rows = {(x["name"], x["budget"]): x for x in rep["rows"]}
    assert {"bf16", "nf4", "skip-list"} <= {n for n, _ in rows}
    for name in ("random", "heuristic", "policy (propagated)", "policy (KL)", "random int8w",
                 "policy (propagated, int8w+bf16)"):
        for budget in ("1.15x nf4", "= skip-list"):
            assert (name, budget) in rows, (name, budget)
    assert rows[("bf16", "-")]["kl"] == 0 and rows[("nf4", "-")]["kl"] > 0
    for (name, budget), x in rows.items():      # equal bytes: every budgeted row within its limit
        if budget == "1.15x nf4":
            assert 1.0 < x["bytes_vs_nf4"] <= 1.15
        if budget == "= skip-list":
            assert x["bytes"] <= rows[("skip-list", "-")]["bytes"]
    assert (tmp_path / "quant_policies.md").read_text().count("\n| ") >= 9
    for metric in ("propagated", "output"):    # where the analysis time went, per metric
        t = rep["analysis_timing"][metric]
        assert t["sensitivity"] == metric and t["groups"] > 0 and t["sensitivity_s"] > 0
        assert t["total_s"] >= t["capture_s"] + t["layer_errors_s"] + t["sensitivity_s"] - 1e-3


def test_quant_skip_cost_tiny(tmp_path):
    out = tmp_path / "skip.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quant_skip_cost.py"), "--tiny",
                        "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for row in json.loads(out.read_text())["rows"]:
        assert row["same_modules_converted"]
        assert row["merged"]["keys"] == 1 and row["merged"]["regex_compiles"] <= 2
        assert row["explicit"]["re_match_calls"] > row["merged"]["re_match_calls"]


def test_quant_analysis_cost_tiny(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quant_analysis_cost.py"), "--tiny",
                        "--device", "cpu", "--out", str(tmp_path), "--metrics", "propagated,output,propagated@model"],
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((tmp_path / "quant_analysis_cost.json").read_text())
    assert set(rep["metrics"]) == {"propagated", "output", "propagated@model"}
    # the bf16 analysis is compared with the float32 one, layer by layer
    same = rep["metrics"].pop("propagated@model")["vs_propagated"]
    assert same["same_plan"] == (same["only_here"] == same["only_there"] == [])
    assert "propagated@model: analysis" in r.stdout and "plan of propagated" in r.stdout.replace("plan as", "plan of")
    for metric, row in rep["metrics"].items():
        t = row["timing"]
        assert t["sensitivity"] == metric and t["groups"] > 0 and row["protected_layers"] > 0
        assert row["wall_s"] + 0.01 >= t["total_s"] > 0      # wall_s: 2 decimals
    assert 0 < rep["protected_overlap"]["both"] <= rep["protected_overlap"]["either"]
    assert "propagated: analysis" in r.stdout and "output: analysis" in r.stdout


def test_int8w_linear_tiny(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "int8w_linear.py"), "--tiny", "--device", "cpu",
                        "--out", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {x["layer"]: x for x in json.loads((tmp_path / "int8w_linear.json").read_text())["rows"]}
    assert set(rows) == {"bf16 nn.Linear", "int8w Int8Linear", "nf4 bnb Linear4bit"}
    assert rows["bf16 nn.Linear"]["rel_error_vs_bf16"] == 0
    # the tier's point: far below NF4's error at ~half of 16-bit's weight bytes
    assert 0 < rows["int8w Int8Linear"]["rel_error_vs_bf16"] < 0.2 * rows["nf4 bnb Linear4bit"]["rel_error_vs_bf16"]
    assert rows["int8w Int8Linear"]["weight_MiB"] < 0.6 * rows["bf16 nn.Linear"]["weight_MiB"]
