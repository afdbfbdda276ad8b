"""choose_protected: outliers before marginal per-byte gains, and a budget that adds up.

The errors are the shape issue 17 reported (decoder layer 1's down_proj: activation error 0.92,
ten times the median; four small vision layers at 0.19–0.26): ranking by error per byte saved
filled the budget with the vision layers and left down_proj in NF4.
"""

import pytest

from vlm.quant.plan import resolve_plan
from vlm.quant.policy import QuantPolicy
from vlm.quant.sensitivity import choose_protected

OUTLIER = "model.language_model.layers.1.mlp.down_proj"
SMALL_VISION = {"model.visual.blocks.0.attn.proj": 0.26, "model.visual.blocks.1.attn.proj": 0.24,
                "model.visual.blocks.0.mlp.fc2": 0.21, "model.visual.blocks.1.mlp.fc2": 0.19}


@pytest.fixture(scope="module")
def plan_and_errors(tiny_checkpoint):
    from transformers import AutoConfig

    from vlm.families import family_for_config
    from vlm.quant.loading import meta_model

    config = AutoConfig.from_pretrained(tiny_checkpoint("qwen2_vl"))
    plan = resolve_plan(QuantPolicy.parse("dynamic"), meta_model(config), family_for_config(config))
    errors = {}
    for n, lp in plan.layers.items():
        if lp.reason != "component":
            continue
        e = 0.92 if n == OUTLIER else SMALL_VISION.get(n, 0.09)
        errors[n] = {"weight_error": 0.09, "activation_error": e,
                     "output_kl": 1e-3 if n == OUTLIER else 1e-5 * e / 0.09}
    return plan, errors


def test_old_ranking_leaves_the_outlier_in_nf4(plan_and_errors):
    """The failure being fixed, reproduced: per-byte greedy on activation error."""
    plan, errors = plan_and_errors
    old, _ = choose_protected(plan, errors, budget=0.10, metric="activation", outliers_first=False)
    assert OUTLIER not in old and set(SMALL_VISION) <= old


@pytest.mark.parametrize("metric", ["output", "activation"])
def test_outlier_is_protected_first_under_the_default_budget(plan_and_errors, metric):
    plan, errors = plan_and_errors
    protected, a = choose_protected(plan, errors, budget=0.10, metric=metric)
    assert OUTLIER in protected
    assert a["protected_groups"][0]["group"] == OUTLIER
    assert a["protected_groups"][0]["why"] == "local outlier"
    assert a["outliers"][0] == OUTLIER


def test_budget_counts_what_it_protects(plan_and_errors):
    plan, errors = plan_and_errors
    dq = plan.policy.double_quant
    for budget in (0.10, 0.03, 20_000):
        protected, a = choose_protected(plan, errors, budget=budget)
        params = sum(plan.layers[n].params for n in protected)
        extra = sum(plan.layers[n].nbytes("bf16", dq) - plan.layers[n].nbytes("nf4", dq)
                    for n in protected)
        assert a["extra_bytes"] == extra
        assert a["budget_spent"] == (params if isinstance(budget, float) else extra)
        assert a["budget_spent"] <= a["budget_limit"]
        if OUTLIER not in protected:       # too small for it: said, not silent
            assert [o["group"] for o in a["outliers_over_budget"]] == [OUTLIER]
    # and the resulting plan's bytes are the NF4 plan's plus exactly the extra bytes
    protected, a = choose_protected(plan, errors, budget=0.10)
    nf4 = {n: lp.precision for n, lp in plan.layers.items()}
    kept = dict(nf4, **{n: "bf16" for n in protected})
    assert plan.bytes_if(kept, dq) - plan.bytes_if(nf4, dq) == a["extra_bytes"]


def test_ties_and_order_are_deterministic(plan_and_errors):
    plan, errors = plan_and_errors
    runs = [choose_protected(plan, dict(reversed(list(errors.items()))), budget=0.10)[1]
            for _ in range(2)] + [choose_protected(plan, errors, budget=0.10)[1]]
    assert runs[0]["protected_groups"] == runs[1]["protected_groups"] == runs[2]["protected_groups"]
