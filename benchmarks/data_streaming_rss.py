"""Bounded-memory check: read and validate a large JSONL, watching the process RSS.

    python benchmarks/data_streaming_rss.py [--records 200000] [--json OUT]

Writes a JSONL of ShareGPT records (each pointing at one of 16 small PNGs, multi-turn text of a
few hundred bytes), then streams it through ``iter_conversations`` (parse + structure checks +
image checks) and samples RSS every 10,000 records. Memory must not grow with the number of records:
the report gives the RSS growth between the first checkpoint (after 20,000 records) and the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil

from vlm.data_formats.reader import iter_conversations
from vlm.data_formats.rejects import RejectLog


def write_dataset(folder: Path, records: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for k in range(16):
        Image.new("RGB", (32, 32), (k * 15, 255 - k * 15, 100)).save(folder / "img" / f"{k}.png")
    path = folder / "big.jsonl"
    words = "the a red blue circle square left right top bottom large small image shows".split()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(records):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            rec = {"id": f"r{i}", "image": f"img/{i % 16}.png",
                   "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                     {"from": "gpt", "value": a},
                                     {"from": "human", "value": q[::-1]},
                                     {"from": "gpt", "value": a.upper()}]}
            if i % 1000 == 999:  # some bad records too: the skip path must stay bounded as well
                rec["conversations"][0]["from"] = "robot"
            fh.write(json.dumps(rec) + "\n")
    return path


def measure(path: Path, first_checkpoint: int = 20_000, every: int = 10_000) -> dict:
    proc = psutil.Process()
    gc.collect()
    rss = {}
    start = time.perf_counter()
    n = 0
    with RejectLog(path.with_name("rejects.jsonl")) as rejects:
        for n, _conv in enumerate(iter_conversations(path, on_error="skip", rejects=rejects), start=1):
            if n % every == 0:
                rss[n] = proc.memory_info().rss
    elapsed = time.perf_counter() - start
    rss[n] = proc.memory_info().rss
    marks = sorted(k for k in rss if k >= first_checkpoint)
    growth = rss[marks[-1]] - rss[marks[0]] if marks else 0
    return {"valid_records": n, "rejected": rejects.total, "seconds": round(elapsed, 2),
            "records_per_s": round((n + rejects.total) / elapsed),
            "rss_mb": {str(k): round(v / 2**20, 1) for k, v in rss.items()},
            "rss_growth_mb": round(growth / 2**20, 2), "from_record": marks[0] if marks else None,
            "to_record": marks[-1] if marks else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dataset(Path(tmp), args.records)
        size_mb = os.path.getsize(path) / 2**20
        result = measure(path)
        result["file_mb"] = round(size_mb, 1)
    print(f"{args.records:,} records ({result['file_mb']} MB JSONL): {result['seconds']} s, "
          f"{result['records_per_s']:,} records/s, RSS growth {result['rss_growth_mb']} MB between "
          f"record {result['from_record']:,} and {result['to_record']:,}")
    print("RSS (MB) by record:", result["rss_mb"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
