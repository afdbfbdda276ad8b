"""benchmarks/quant_policies.py and quant_skip_cost.py end to end on CPU (--tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        for budget in ("1.15x nf4", "1.08x nf4", "= skip-list"):
            assert (name, budget) in rows, (name, budget)
    assert rows[("bf16", "-")]["kl"] == 0 and rows[("nf4", "-")]["kl"] > 0
    for (name, budget), x in rows.items():      # equal bytes: every budgeted row within its limit
        if budget in ("1.15x nf4", "1.08x nf4", "1.08x"):
            assert 1.0 < x["bytes_vs_nf4"] <= float(budget.split("x")[0])
        if budget == "= skip-list":
            assert x["bytes"] <= rows[("skip-list", "-")]["bytes"]
    # the product's default, planned by vlm.quant.loading.analyse: the same plan as the tiered
    # planner's at its budget (the projector is a candidate like every other linear)
    default = rows[("dynamic (default preset)", "1.08x")]
    tiered = rows[("policy (propagated, int8w+bf16)", "1.08x nf4")]
    assert default["bytes"] == tiered["bytes"] and default["kl"] == tiered["kl"]
    assert (tmp_path / "quant_policies.md").read_text().count("\n| ") >= 9
    for metric in ("propagated", "output"):    # where the analysis time went, per metric
        t = rep["analysis_timing"][metric]
        assert t["sensitivity"] == metric and t["groups"] > 0 and t["sensitivity_s"] > 0
        assert t["total_s"] >= t["capture_s"] + t["layer_errors_s"] + t["sensitivity_s"] - 1e-3


def test_quant_memory_tiny_and_full_size_plan(tmp_path):
    """quant_memory.py: the GPU measurement's smoke run (tiny shapes on CPU: every policy of both
    models loads, the dynamic plan within its cap), and --plan-only at the real shapes (meta device):
    the default dynamic policy's cap, whatever the ranking, fits the published dynamic figures with
    the 0.05 GiB the GPU added above the plan in the last measurement (results/quant_memory.md)."""
    script = str(REPO / "benchmarks" / "quant_memory.py")
    r = subprocess.run([sys.executable, script, "--tiny", "--device", "cpu", "--out", str(tmp_path / "tiny")],
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads((tmp_path / "tiny" / "quant_memory.json").read_text())["rows"]
    assert [(x["model"], x["policy"]) for x in rows] == [(m, p) for m in ("qwen2_vl_2b", "mllama_11b")
                                                         for p in ("bf16", "nf4", "dynamic")]
    for x in rows:
        if x["policy"] == "dynamic":
            cap = x["budget"]["budget_nf4"]["cap_bytes"]
            assert x["plan_gib"] * 2**30 <= cap and x["budget"]["budget"] == "1.08x"
    r = subprocess.run([sys.executable, script, "--plan-only", "--out", str(tmp_path / "plan")],
                       env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    plan = {x["model"]: x for x in json.loads((tmp_path / "plan" / "quant_memory_plan.json").read_text())["rows"]}
    for name, x in plan.items():
        assert x["budget"] == "1.08x" and x["tiers"] == ["int8w", "bf16"]
        assert x["floor_gib"] == x["nf4_gib"] and x["cap_gib"] == pytest.approx(1.08 * x["nf4_gib"])
        for ranking, gib in x["planned_gib"].items():
            assert x["nf4_gib"] < gib <= x["cap_gib"], (name, ranking)
        assert x["cap_gib"] + 0.05 <= x["published_gib"], name
    assert plan["mllama_11b"]["cap_gib"] < 7.17 and plan["qwen2_vl_2b"]["cap_gib"] < 1.50


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
