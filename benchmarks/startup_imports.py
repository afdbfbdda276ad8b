"""What `vlm train` imports before it loads the model, and where that time goes (CPU or GPU machine).

    python benchmarks/startup_imports.py [--runs 3] [--top 25]

Each run is a fresh ``python -X importtime`` process that does what `vlm train CONFIG` does before
``train()`` starts its clock: the CLI (``vlm.cli.main`` builds its parser: every subcommand module),
the config loader, ``vlm.train.recipe`` and the imports at the head of ``recipe.train``. Prints the
median wall time over the runs, the split by package of the CLI's own import clock
(``vlm.train.startup_clock``: what ``summary.json`` reports as ``startup_seconds.imports_split``),
and the modules with the largest cumulative import time (with the chain that imported them first),
from the last run. Nothing here trains or loads a model; the figures are this machine's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# the head of vlm.train.recipe.train (keep in step with it)
SNIPPET = """
import time, json
t0 = time.perf_counter()
import vlm.cli.main as cli
cli.install_import_clock()   # as `vlm` does in main()
cli.build_parser()
from vlm.train.config import load_config
from vlm.train.recipe import train
from transformers import TrainingArguments, set_seed
import vlm
from vlm.data_formats.collator import VisionChatCollator
from vlm.data_formats.resolution import Resolution
from vlm.lora import apply_lora
from vlm.train import distributed, packed_forward
from vlm.train.metrics import plot_loss_curve
from vlm.quant.loading import quant_metadata
from vlm.train.dataset import prepare_train_set, resolve_workers, sampler_factory, token_budget_groups
from vlm.train.trainer import VlmTrainer, dynamo_graphs, steady_rate
from vlm.train.startup_clock import import_split
print("SPLIT " + json.dumps(import_split()))
"""


def parse_importtime(stderr: str) -> list[tuple[int, str, int]]:
    """(depth, module, cumulative µs) per ``-X importtime`` line, in the order printed (children first)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        _, rest = line.split(":", 1)
        _self_us, cumulative, name = rest.split("|")
        rows.append(((len(name) - len(name.lstrip()) - 1) // 2, name.strip(), int(cumulative)))
    return rows


def importer_chain(rows, i: int, limit: int = 4) -> str:
    """Who imported rows[i] (its ancestors: the next lines with a smaller depth)."""
    depth, chain = rows[i][0], []
    for d, name, _ in rows[i + 1:]:
        if d < depth:
            chain.append(name)
            depth = d
            if len(chain) == limit:
                break
    return " <- ".join(chain)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    walls, split, rows = [], None, []
    for _ in range(args.runs):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", SNIPPET], capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        split = next(line[6:] for line in r.stdout.splitlines() if line.startswith("SPLIT "))
        rows = parse_importtime(r.stderr)
    print(f"imports before the model loads: median {statistics.median(walls):.2f} s over {args.runs} runs "
          f"({', '.join(f'{w:.2f}' for w in walls)}; -X importtime adds its own overhead)")
    print(f"by package (exclusive seconds, last run): {split}")
    print(f"top {args.top} modules by cumulative import time (last run):")
    seen, shown = set(), 0
    for i in sorted(range(len(rows)), key=lambda i: -rows[i][2]):
        name = rows[i][1]
        if name in seen:
            continue
        seen.add(name)
        print(f"  {rows[i][2] / 1e6:7.2f} s  {name}  <- {importer_chain(rows, i) or '(top level)'}")
        shown += 1
        if shown == args.top:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
