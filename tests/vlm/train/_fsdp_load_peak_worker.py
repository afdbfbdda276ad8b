"""Worker for test_fsdp_load_peak.py: ``vlm.train.recipe.train`` in 2 gloo processes with FSDP2,
counting the bytes of live tensors around every ``fully_shard`` call (ours and accelerate's).
``python _fsdp_load_peak_worker.py CONFIG OUT_DIR FROZEN_TOWERS``; writes OUT_DIR/rank{r}.json
(FROZEN_TOWERS: ``distributed.fsdp_frozen_towers``).

The count: every tensor the garbage collector tracks (parameters, the shards FSDP2 makes, the
tensors of a state dict someone keeps), each storage once, by its exact byte size. A DTensor is a
wrapper without storage of its own: its local shard is a tensor of its own and counted as such.
Deterministic (no allocator or RSS figure): the same run gives the same numbers."""

from __future__ import annotations

import functools
import gc
import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp


def live_tensor_bytes() -> int:
    from torch.distributed.tensor import DTensor

    seen: dict[tuple, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or isinstance(obj, DTensor) or obj.device.type == "meta":
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):   # other wrapper subclasses: no storage of their own
            continue
        seen[(obj.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _run(rank: int, config: str, out: str, towers: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed.fsdp as fsdp

    from vlm.train.config import load_config
    from vlm.train.recipe import train

    record = {"calls": []}
    original = fsdp.fully_shard

    @functools.wraps(original)
    def counted(module, *args, **kwargs):
        if "before_first" not in record:   # the first call: the model as loaded, nothing sharded yet
            record["before_first"] = live_tensor_bytes()
        result = original(module, *args, **kwargs)
        record["calls"].append(live_tensor_bytes())
        return result

    fsdp.fully_shard = counted
    cfg = load_config(config)
    cfg.distributed.strategy = "fsdp"
    cfg.distributed.fsdp_frozen_towers = towers
    summary = train(cfg, progress=False).summary
    record["whole"] = summary["sharding"]["parameter_bytes_whole"]
    record["loss_history"] = summary["loss_history"]
    record["sharding"] = summary["sharding"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    config, out, towers = sys.argv[1], sys.argv[2], sys.argv[3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(config, out, towers, port), nprocs=2, join=True)
