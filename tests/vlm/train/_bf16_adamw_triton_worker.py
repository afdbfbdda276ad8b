"""Worker for test_bf16_adamw.py: BF16AdamW's compiled update as inductor writes it for a GPU (Triton
code, the CUDA hash words), run on the CPU by Triton's interpreter, beside the eager update.

``python _bf16_adamw_triton_worker.py OUT ROUNDING``: writes {"eager": ..., "compiled": ...} (weights
and optimizer states after 5 steps) to OUT. A process of its own: the interpreter, inductor's CPU
backend and its code cache must be chosen before torch compiles anything, and must not leak into
other tests."""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"        # Triton's interpreter runs the kernels (numpy, no GPU)

import torch  # noqa: E402
import torch.utils._triton as torch_triton  # noqa: E402

# No GPU driver here: Triton cannot name a target, which inductor only needs for its cache keys.
torch_triton.triton_backend = lambda: None
torch_triton.triton_hash_with_backend = lambda: "TRITON-INTERPRETER-ON-CPU"
torch._inductor.config.cpu_backend = "triton"   # CPU tensors compiled to Triton code, as CUDA ones

import vlm.train.bf16_adamw as bf16_adamw  # noqa: E402

bf16_adamw._wide = lambda t: True              # CUDA's int64 hash words (what the GPU compiles)

SHAPES = [(256, 64)]                  # the GPU test's matrix (where the H200 run failed): one compiled graph
STEPS = 5


def run(rounding: str, compiled: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in SHAPES]
    opt = bf16_adamw.BF16AdamW(params, lr=1e-3, weight_decay=0.01, rounding=rounding, compile=compiled, seed=3)
    grads = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads).to(torch.bfloat16)
        opt.step()
    return {"weights": [p.detach().clone() for p in params],
            "states": [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()}
                       for p in params]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, rounding = sys.argv[1], sys.argv[2]
    torch.save({"eager": run(rounding, False), "compiled": run(rounding, True)}, out)
