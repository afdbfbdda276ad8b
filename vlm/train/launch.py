"""``vlm train CONFIG --nproc N``: start N training processes through ``accelerate launch``.

The command re-runs itself as ``accelerate launch --multi_gpu --num_processes N -m vlm train CONFIG
...`` (accelerate's multi-process launcher is torchrun underneath; on a CPU-only machine it starts
N CPU processes and the Trainer joins them with gloo). The processes read the same YAML; DDP vs
FSDP and their settings come from its ``distributed:`` section (``vlm.train.distributed``).

For accelerate's own config files (``accelerate config``, ``--use_fsdp``, several machines) call
accelerate directly: ``accelerate launch --config_file fsdp.yaml -m vlm train CONFIG``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from vlm.errors import VlmError


def accelerate_command(args) -> list[str]:
    """The ``accelerate launch`` command line that runs ``vlm train`` on ``args.nproc`` processes."""
    n = int(args.nproc)
    if n < 1:
        raise VlmError(f"--nproc: must be >= 1, got {n}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
           # precision and compilation are the recipe's (training.precision), not accelerate's
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", os.environ.get("MASTER_PORT", "0"),   # 0: a free port
           "-m", "vlm", "train", str(args.config), *args.overrides]
    if getattr(args, "resume", False):
        cmd.append("--resume")
    return cmd


def _gpu_count() -> int:
    """CUDA devices, without importing torch on machines that have no NVIDIA driver (start-up time)."""
    if not os.path.exists("/dev/nvidiactl"):
        return 0
    import torch

    return torch.cuda.device_count()


def relaunch_with_accelerate(args) -> int:
    """Run ``vlm train`` on ``args.nproc`` processes; returns the launcher's exit code."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise VlmError("--nproc inside an already launched multi-process run: drop --nproc")
    n_gpu = _gpu_count()
    if n_gpu and args.nproc > n_gpu:
        raise VlmError(f"--nproc {args.nproc}: this machine has {n_gpu} GPU(s); one process per GPU")
    cmd = accelerate_command(args)
    print("launch: " + " ".join(cmd[1:]), flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:  # the launcher (same process group) got the signal too
        return 130
