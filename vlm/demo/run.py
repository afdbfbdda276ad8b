"""`vlm demo`: teach the self-trained tiny base a new captioning task with QLoRA, before vs after.

1. Generate a fresh task the base has never seen: the demo vocabulary ("navy star, huge, upper
   left" for what the base calls "a large blue diamond in the top left": words the base never used
   in a caption, a new question and a new order); train and held-out sets use different seeds.
2. Load the shipped base (``vlm/zoo/assets/demo_base``) under the ``dynamic`` 4-bit policy and
   score greedy captions on the held-out images: exact match and per-attribute accuracy.
3. Fine-tune LoRA adapters with the ``configs/demo.yaml`` recipe (the same ``vlm train`` path), or
   with ``config=configs/demo_full.yaml`` every weight in bf16 (``method: full``), or with
   ``configs/demo_projector.yaml`` the projector only.
4. Reload what was saved (base + adapter, the full checkpoint, or base + projector) and score again.
   Everything lands in one folder.

Every number printed is measured in this run.
"""

from __future__ import annotations

import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def _plot(before: dict, after: dict, out_png: Path, method: str = "lora") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["exact", *before["per_attribute"]]
    b = [before["exact_match"], *before["per_attribute"].values()]
    a = [after["exact_match"], *after["per_attribute"].values()]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.bar([i - 0.2 for i in x], b, width=0.4, label="base")
    ax.bar([i + 0.2 for i in x], a, width=0.4, label=f"after ({method})")
    ax.set_xticks(list(x), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def run_demo(out_dir: str | Path | None = None, *, base: str | Path | None = None, n_train: int = 384,
             n_heldout: int = 100, overrides: list[str] | None = None, seed: int = 0,
             config: str | Path | None = None) -> dict:
    """Run the demo; returns the results dict (also written to ``OUT/demo_results.json``)."""
    import torch
    from peft import PeftModel

    import vlm
    from vlm.data_formats.scene_vocab import DEMO_VOCAB
    from vlm.data_formats.synthetic import generate
    from vlm.quant.loading import quant_metadata
    from vlm.demo.accuracy import caption_accuracy, heldout_items
    from vlm.atomic import write_json
    from vlm.train.config import load_config
    from vlm.train.recipe import train
    from vlm.zoo.demo_base import IMAGE_SIZE, SHIPPED

    t0 = time.perf_counter()
    out = Path(out_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = Path(base or SHIPPED)
    print(f"vlm demo: outputs go to {out}")
    print(f"base model: {base} (a ~1.2 M-parameter Qwen2-VL the project trained on its synthetic "
          "captions)")

    # 1. a task the base does not know
    train_set = generate(out / "data" / "train", n=n_train, seed=seed + 1, image_size=IMAGE_SIZE,
                         vocab=DEMO_VOCAB)
    items = heldout_items(out / "data" / "heldout", DEMO_VOCAB, n=n_heldout, seed=seed + 2,
                          image_size=IMAGE_SIZE)
    print(f"new task: {DEMO_VOCAB.question!r} -> e.g. {train_set.captions[0]!r} "
          f"({n_train} training images, {n_heldout} held-out)")

    cfg = load_config(config or DEMO_CONFIG, [f"model.path={base}", f"data.train=[{train_set.sharegpt_json}]",
                                    f"output={out / 'train'}", f"training.seed={seed}", *(overrides or [])])

    # 2. before
    device = cfg.model.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = vlm.load(base, dtype=cfg.model.dtype, device=device, quant=cfg.quant,
                                calibration=str(train_set.sharegpt_json))
    counts = (quant_metadata(model) or {}).get("counts")
    before = caption_accuracy(model, processor, items, DEMO_VOCAB)
    print(f"before fine-tuning: exact {_pct(before['exact_match'])}  e.g. "
          f"{before['examples'][0]['caption']!r} (want {before['examples'][0]['reference']!r})")
    del model

    # 3. fine-tune with the recipe
    result = train(cfg)

    # 4. after: the saved adapter on a freshly loaded base
    if cfg.method == "full":      # the saved standard checkpoint on its own
        model, processor = vlm.load(result.adapter_dir, dtype=cfg.model.dtype, device=device)
    else:
        model, processor = vlm.load(base, dtype=cfg.model.dtype, device=device, quant=cfg.quant,
                                    calibration=str(train_set.sharegpt_json))
        if cfg.method == "projector":
            from vlm.train.modes import load_projector

            load_projector(model, model.vlm_family, result.adapter_dir)
        else:
            model = PeftModel.from_pretrained(model, result.adapter_dir)
    after = caption_accuracy(model, processor, items, DEMO_VOCAB)

    _plot(before, after, out / "accuracy.png", cfg.method)
    results = {
        "output_dir": str(out), "base": str(base), "task": DEMO_VOCAB.name,
        "n_train": n_train, "n_heldout": n_heldout, "quant_counts": counts, "method": cfg.method,
        "before": before, "after": after,
        "train": {k: result.summary[k] for k in ("steps", "final_loss", "tokens_per_s", "train_seconds",
                                                 "peak_memory_bytes", "peak_memory_kind",
                                                 "trainable_parameters")},
        "adapter": str(result.adapter_dir), "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "demo_results.json", results)

    print("\nheld-out accuracy      before    after")
    print(f"  exact match          {_pct(before['exact_match'])}   {_pct(after['exact_match'])}")
    for a in before["per_attribute"]:
        print(f"  {a:<20} {_pct(before['per_attribute'][a])}   {_pct(after['per_attribute'][a])}")
    for ex in after["examples"][:3]:
        print(f"  after: {ex['caption']!r}  (reference {ex['reference']!r})")
    final = results["train"]["final_loss"]
    print(f"\ntrained {results['train']['steps']} steps, final loss "
          f"{'n/a' if final is None else f'{final:.3f}'}, "
          f"{results['train']['tokens_per_s']} tokens/s; total {results['wall_seconds']} s")
    saved = {"full": "model", "projector": "projector"}.get(cfg.method, "adapter")
    print(f"outputs: {out}  ({saved}: {result.adapter_dir}, summary.json, loss_curve.png, "
          "accuracy.png, demo_results.json)")
    return results
