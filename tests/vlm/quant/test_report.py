"""`vlm quant-report`: JSON keys exactly as issue #4 lists them, a plot, sane totals."""

import json


def test_quant_report_json_and_plot(tiny_checkpoint, tmp_path):
    from vlm.cli.main import main

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["quant-report", str(tiny_checkpoint("qwen2_vl")), "--policy", "dynamic",
               "--budget", "0.2", "--json", str(out), "--plot", str(png), "--device", "cpu"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert {"layers", "totals", "agreement"} <= set(rep)
    assert {"name", "component", "params", "weight_error", "activation_error", "precision"} <= set(rep["layers"][0])
    assert set(rep["totals"]) == {"bf16_bytes", "nf4_bytes", "policy_bytes"}
    assert set(rep["agreement"]) == {"nf4", "policy"}
    for a in rep["agreement"].values():
        assert set(a) == {"kl", "top1"} and a["kl"] >= 0 and 0 <= a["top1"] <= 1
    t = rep["totals"]
    assert t["nf4_bytes"] < t["policy_bytes"] < t["bf16_bytes"]
    assert rep["policy"]["budget"] == 0.2
    assert all(r["activation_error"] is not None for r in rep["layers"])   # every layer ran
    # the default metric's group sensitivity of every layer but a lm_head tied to the embeddings
    # (never quantized); the KL is not run for it
    assert rep["policy"]["metric"] == "propagated" and all(r["output_kl"] is None for r in rep["layers"])
    assert rep["timing"]["sensitivity"] == "propagated" and rep["timing"]["groups"] > 0
    kls = {r["name"]: r["block_error"] for r in rep["layers"]}
    assert all(v is not None and v >= 0 for n, v in kls.items() if n != "lm_head")
    assert max(kls.values(), key=lambda v: v or 0) > 0
    # the budget counts what the plan weighs above NF4 (the dynamic preset's floor is the nf4 model),
    # each protected group once, in its final tier
    assert rep["budget"]["extra_bytes"] == t["policy_bytes"] - t["nf4_bytes"]
    assert rep["budget"]["extra_bytes"] == sum(g["extra_bytes"] for g in rep["protected"])
    assert len({g["group"] for g in rep["protected"]}) == len(rep["protected"])
    assert png.stat().st_size > 1000


def test_quant_report_bad_policy_is_one_line_error(tiny_checkpoint, capsys):
    from vlm.cli.main import main

    rc = main(["quant-report", str(tiny_checkpoint("qwen2_vl")), "--policy", "dynamic",
               "--budget", "2.5", "--device", "cpu"])
    assert rc != 0
    assert "budget" in capsys.readouterr().err
