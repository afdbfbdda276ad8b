"""Full fine-tuning and projector pretraining: vlmtune vs the Hugging Face setup, side by side (issue 21).

    python benchmarks/train_modes.py                        # GPU: every part (random weights, real shapes)
    python benchmarks/train_modes.py --tiny --device cpu    # smoke test of every code path on CPU
    python benchmarks/train_modes.py --parts full           # one part: full | projector | optim

Part "full": Qwen2-VL-2B shapes (random bf16 weights built on the device), workload W of
train_step_workload.py (batch 8 × 512 tokens, one 448×448 image each, labels on the 254 text tokens).
Trained: the language model, embeddings/lm_head and the merger; the vision tower is frozen (what
`method: full` trains with training.train_vision: false). Every row clips the gradient norm to 1.0;
lr 1e-5; the same batches (same tokens) in every row.
  full_hf    transformers Trainer's bf16 mixed precision: fp32 weights under bf16 autocast,
             torch.optim.AdamW, fused on CUDA (Trainer's default optim adamw_torch_fused): 16 bytes
             per trained parameter; non-reentrant gradient checkpointing (gradient_checkpointing=True)
  full_hf_nogc  the same without checkpointing: Trainer's default (gradient_checkpointing=False)
  full_ours  what `vlm train` does with method: full (vlm.train.modes.prepare, vlm.train.fast_path:
             batched vision attention, kernels.patch, compiled layers and frozen vision blocks): bf16
             weights and grads, BF16AdamW (bf16 moments, stochastic rounding; fp32 master for
             norms/biases); training.gradient_checkpointing: auto (vlm.train.checkpointing: off where
             the device holds the step without it, i.e. at 2B on an 80-141 GB GPU; on on CPU)
  full_ours_gc    the same with checkpointing forced on (compare with full_hf: same recompute)
  full_ours_8bit  the same as full_ours with training.optimizer: adamw_8bit (bitsandbytes' blockwise
             8-bit moments; needs bitsandbytes on the device: carry .whl/, see device_install.sh)
  full_ours_nogc  (only with --variants) full_ours with checkpointing forced off
Each row also times one extra step split into forward / backward / clip / optimizer (synchronized
between phases: "phases_s"); --profile adds torch.profiler's top ops of that step.

Part "optim": the optimizer step alone on the trained parameters of part "full" (Qwen2-VL-2B, random
gradients), median ms per step:
  optim_torch        torch.optim.AdamW (foreach) on fp32 weights and grads: Trainer's adamw_torch
  optim_torch_fused  the same with fused=True (Trainer's adamw_torch_fused)
  optim_legacy       BF16AdamW's first step: per weight, two small device tensors built by blocking
                     copies (a device sync per weight), kept here as the baseline of the change
  optim_ours         BF16AdamW as `vlm train` runs it (host step numbers, one copy per step; on CUDA
                     compiled updates 16 tensors per call)
  optim_ours_8bit    the same with 8-bit moments

Part "projector": LLaVA-1.5-7B shapes (CLIP ViT-L/336 + Llama-2-7B, random bf16 weights), caption
pairs as in LLaVA's stage 1: batch 16 × 616 tokens = 1 BOS, 576 <image> tokens, 1 newline, a
38-token caption (labels on the caption). Only the projector trains; lr 1e-3.
  proj_hf    the HF setup: the model in fp32 under bf16 autocast (Trainer's mixed precision),
             tower and language model frozen, gradient checkpointing with enable_input_require_grads,
             torch.optim.AdamW (fused on CUDA) on the projector
  proj_ours  what `vlm train` does with method: projector (bf16 model, frozen tower under no_grad,
             gradient checkpointing inside the compiled layers, fused linear CE (no logits tensor);
             BF16AdamW with an fp32 master for the projector)
  proj_ours_mb2  the same without checkpointing, the 16 rows as 8 micro-batches of 2 (gradient
             accumulation; one optimizer step on the same 16 rows). Why: the language model is
             frozen, so its backward is the input gradient only (1× forward FLOPs); checkpointing
             adds a second forward (3× instead of 2×: the step is ~1/3 longer), and without it the
             saved activations are ~3 MB per token (norm inputs, q/k/v/attention out, gate/up:
             ~46 k bf16 values per token and layer at Llama-2-7B; the frozen linears keep no input)
             = ~30 GB for 16 × 616 tokens, ~3.7 GB for 2 × 616. Micro-batches of 1,232 tokens keep
             7B matmuls compute-bound.
  proj_hf16  (only with --variants) Trainer's setup with the frozen parts loaded in bf16 (what
             LLaVA's own scripts load): a second, stronger baseline
  proj_ours_nogc  (only with --variants) proj_ours without checkpointing, micro-batch 16
  proj_ours_mb1, proj_ours_mb4  (only with --variants) proj_ours_mb2 with micro-batches of 1 / 4 rows

Every variant builds the same random weights on the device (bf16 from one seed, cast to fp32 for
the HF rows: the same values) and trains in train mode, as Trainer does: in eval mode (what
``from_pretrained`` returns) transformers' checkpointing wrapper silently does nothing, which made
the HF rows of results/train_modes_full.md (4a2d556) run *without* checkpointing while ours
checkpointed inside its compiled layers. Rows with eager decoder layers report
``decoder_layer_calls_per_forward`` (2 = checkpointing recomputes, 1 = it does not).

Per variant (own subprocess on a GPU; --tiny: one process per part): median step time over --steps after --warmup, tokens/s (all tokens,
image tokens included), peak CUDA memory allocated, and bytes per trained parameter held in
weights + grads + optimizer state (counted from the tensors after the last step). Ratios ours/HF
come from the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
GiB = 2 ** 30
PARTS = {"full": ("full_hf", "full_hf_nogc", "full_ours", "full_ours_gc", "full_ours_8bit"),
         "projector": ("proj_hf", "proj_ours", "proj_ours_mb2"),
         "optim": ("optim_torch", "optim_torch_fused", "optim_legacy", "optim_ours", "optim_ours_8bit")}
EXTRA = {"projector": ("proj_hf16", "proj_ours_nogc", "proj_ours_mb1", "proj_ours_mb4"), "full": ("full_ours_nogc",)}
BASELINES = {"full": ("full_hf", "full_hf_nogc"), "projector": ("proj_hf", "proj_hf16"),
             "optim": ("optim_torch", "optim_torch_fused", "optim_legacy")}
MICRO_BATCH = {"proj_ours_mb1": 1, "proj_ours_mb2": 2, "proj_ours_mb4": 4}   # rows per forward/backward (no
# checkpointing); the other rows of the batch accumulate into the same optimizer step
MODEL = {"full": "qwen2_vl_2b", "projector": "llava_1_5_7b", "optim": "qwen2_vl_2b"}
TARGETS = {"full": {"memory": 0.55, "speed": 2.0}, "projector": {"memory": 0.5, "speed": 1.45}}
OURS = {"full": ("full_ours", "full_ours_gc", "full_ours_8bit", "full_ours_nogc"),
        "projector": ("proj_ours", "proj_ours_mb2", "proj_ours_nogc", "proj_ours_mb1", "proj_ours_mb4"),
        "optim": ("optim_ours", "optim_ours_8bit")}   # the first one's ratios are named "ours/<base>"


def _importable_vlm() -> None:
    try:
        import vlm  # noqa: F401
    except ImportError:
        import quant_memory  # noqa: F401  (its import links vlm/ for an uninstalled checkout)


# --------------------------------------------------------------------------- workload

def caption_batches(config, tiny: bool, n: int = 3) -> list[dict]:
    """LLaVA stage-1 batches: BOS, the image tokens, a newline, a caption (labels on the caption)."""
    import torch

    from train_step_workload import LLAVA_IMAGE

    side = config.vision_config.image_size // config.vision_config.patch_size
    batch, caption = (4, 6) if tiny else (16, 38)   # tiny: 4 rows, so proj_ours_mb2 accumulates 2 micro-batches
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        rows = [torch.cat([torch.tensor([1]), torch.full((side * side,), LLAVA_IMAGE), torch.tensor([13]),
                           torch.randint(2, 32000, (caption,), generator=g)]) for _ in range(batch)]
        ids = torch.stack(rows)
        labels = ids.clone()
        labels[:, : side * side + 2] = -100
        px = config.vision_config.image_size
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "pixel_values": torch.randn(batch, 3, px, px, generator=g)})
    return out


def batches_for(part: str, config, tiny: bool) -> list[dict]:
    if part == "projector":
        return caption_batches(config, tiny)
    from train_step_workload import make_batches

    return make_batches(MODEL[part], config, tiny, n=3)


# --------------------------------------------------------------------------- build (subprocess)

def build(args) -> dict:
    """The part's model config in ``args.ckpt`` (no weights: each variant builds them on its device,
    ``load_model``; saving and reloading 14 GB at 7B would cost a minute of device time)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from train_step_workload import model_config

    config = model_config(MODEL[args.part], args.tiny)
    config.save_pretrained(args.ckpt)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    return {"parameters": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------- one variant (subprocess)

def _cfg(method: str, gc: bool | str, lr: float, optimizer: str = "adamw", batch: int = 1, seq: int = 2048):
    """The config `vlm train` would run; ``batch`` × ``seq``: the workload's micro-batch (what
    training.gradient_checkpointing: auto sizes the activations by)."""
    from vlm.train.config import parse_config

    return parse_config({"method": method, "model": {"path": "random", "dtype": "bf16"}, "kernels": True,
                         "data": {"train": ["unused.json"], "max_length": max(16, seq)},
                         "training": {"lr": lr, "gradient_checkpointing": gc, "precision": "bf16",
                                      "optimizer": optimizer, "batch_size": batch}})


def load_model(args, dtype):
    """The part's random-weight model, built on the device in bf16 from the same seed in every
    variant (the same weights in each process), then cast to ``dtype`` (fp32 for Trainer's mixed
    precision: the same values, exactly). In train mode, as Trainer runs it: ``from_pretrained``
    hands out a model in eval mode, where transformers' checkpointing wrapper does nothing (its
    ``GradientCheckpointingLayer`` checkpoints only when ``self.training``)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(args.ckpt), dtype=torch.bfloat16)
    return model.to(dtype).train()


def micro_batches(variant: str, batch: dict) -> list[dict]:
    """``batch`` as the variant's micro-batches (rows split; every row has the same number of
    labels, so the mean of the micro-batch losses is the batch's loss)."""
    rows = MICRO_BATCH.get(variant)
    n = batch["input_ids"].shape[0]
    if not rows or rows >= n:
        return [batch]
    return [{k: t[i:i + rows] for k, t in batch.items()} for i in range(0, n, rows)]


def setup(variant: str, args, batches):
    import torch

    from vlm.families import family_for_config
    from vlm.load import load_config
    from vlm.train import fast_path, modes
    from vlm.train.no_kv_cache import disable_kv_cache

    part = "full" if variant.startswith("full") else "projector"
    lr = 1e-5 if part == "full" else 1e-3
    family = family_for_config(load_config(args.ckpt))
    info = {}
    if "_ours" in variant:
        gc = (False if variant.endswith("_nogc") or variant in MICRO_BATCH else
              True if variant.endswith("_gc") or part == "projector" else "auto")
        micro = micro_batches(variant, batches[0])[0]
        cfg = _cfg("full" if part == "full" else "projector", gc=gc, lr=lr,
                   optimizer="adamw_8bit" if variant.endswith("_8bit") else "adamw",
                   batch=micro["input_ids"].shape[0], seq=micro["input_ids"].shape[1])
        model = load_model(args, torch.bfloat16)
        model.vlm_family = family
        mode = modes.prepare(model, family, cfg, device=args.device)
        plan = fast_path.resolve(cfg, args.device, "single")
        applied = fast_path.apply(model, family, cfg, plan, [int(batches[0]["attention_mask"][0].sum())])
        info.update(micro_batch=int(micro["input_ids"].shape[0]), compiled_layers=plan.compiled, kernels=str(applied.kernels),
                    gradient_checkpointing=mode.checkpointing.enabled,
                    gradient_checkpointing_reason=mode.checkpointing.reason,
                    compiled_vision_blocks=applied.compiled_vision_blocks, optimizer=mode.optimizer)
        opt_cls, kw = mode.optimizer_cls_and_kwargs
        params = [p for p in model.parameters() if p.requires_grad]
        opt = opt_cls(params, weight_decay=0.0, **kw)
        return model, opt, info
    dtype = torch.bfloat16 if variant == "proj_hf16" else torch.float32
    model = load_model(args, dtype)
    info["micro_batch"] = int(batches[0]["input_ids"].shape[0])
    train = ("projector",) if part == "projector" else ("language", "embeddings", "lm_head", "projector")
    for name, p in model.named_parameters():
        p.requires_grad_(family.component_of(name.rsplit(".", 1)[0]) in train)
    if part == "projector":
        for _, root in family.component_roots(model, "projector"):
            root.float()                      # the trained part in fp32 (mixed precision), either way
    if variant != "full_hf_nogc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    info["gradient_checkpointing"] = variant != "full_hf_nogc"
    if part == "projector":
        model.enable_input_require_grads()    # HF's recipe for a frozen base
    disable_kv_cache(model)   # as vlm train does: no cache built by a training forward (either side)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = args.device.startswith("cuda")       # Trainer's default optim: adamw_torch_fused
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused or None)
    info["optimizer"] = f"torch.optim.AdamW ({dtype}{', fused' if fused else ''})"
    return model, opt, info


def state_bytes(model, opt) -> dict:
    import torch

    trained = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trained)
    w = sum(p.numel() * p.element_size() for p in trained)
    g = sum(p.grad.numel() * p.grad.element_size() for p in trained if p.grad is not None)
    o = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"trained_parameters": n, "bytes_per_param": (w + g + o) / n,
            "weight_bytes_per_param": w / n, "grad_bytes_per_param": g / n, "optimizer_bytes_per_param": o / n}


def legacy_bf16_adamw():
    """BF16AdamW with its first ``step``: per weight, the step count read with ``.item()`` and two
    small device tensors built from Python numbers (each a blocking host-to-device copy)."""
    import torch

    from vlm.train.bf16_adamw import BF16AdamW, adamw_update

    class LegacyBF16AdamW(BF16AdamW):
        @torch.no_grad()
        def step(self, closure=None):
            index = 0
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
                for p in group["params"]:
                    index += 1
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        self._init_state(p, state)
                    state["step"] += 1
                    t = int(state["step"].item())
                    scalars = torch.tensor([lr, lr / (1 - beta1 ** t), 1 - beta2 ** t], dtype=torch.float32,
                                           device=p.device)
                    key = torch.tensor(self._key(t, index), dtype=torch.int64, device=p.device)
                    self._update_fn(p.device)(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                              state.get("master"), state.get("compensation"), scalars, key,
                                              beta1, beta2, eps, wd)

    return LegacyBF16AdamW


def optim_worker(args) -> dict:
    """The optimizer step alone, on part full's trained parameters with fixed random gradients."""
    import torch

    from vlm.families import family_for_config
    from vlm.load import load_config
    from vlm.train import modes

    cuda = args.device.startswith("cuda")
    v = args.worker
    family = family_for_config(load_config(args.ckpt))
    dtype = torch.float32 if v.startswith("optim_torch") else torch.bfloat16
    model = load_model(args, dtype)
    cfg = _cfg("full", gc=True, lr=1e-5, optimizer="adamw_8bit" if v.endswith("_8bit") else "adamw")
    modes.set_trainable(model, family, modes.trainable_components(family, cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=args.device).manual_seed(0)
    for p in params:
        p.grad = (torch.randn(p.shape, device=args.device, generator=g) * 1e-3).to(p.dtype)
    if v.startswith("optim_torch"):
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=v.endswith("_fused"),
                                foreach=None if v.endswith("_fused") else True)
        name = "torch.optim.AdamW (fp32" + (", fused)" if v.endswith("_fused") else ", foreach)")
    else:
        (cls, kw), name = modes.optimizer_for(model, cfg)
        if v == "optim_legacy":
            cls, name = legacy_bf16_adamw(), name + " first version"
        opt = cls(params, weight_decay=0.0, **kw)
    walls = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    med = statistics.median(walls[args.warmup:])
    row = {"variant": v, "optimizer": name, **state_bytes(model, opt), "step_s_median": med,
           "tokens_per_s": None, "first_step_s": walls[0]}
    if cuda:
        row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
    return row


def worker(args) -> dict:
    import torch

    from vlm.load import load_config

    if args.worker.startswith("optim"):
        return optim_worker(args)

    cuda = args.device.startswith("cuda")
    part = "full" if args.worker.startswith("full") else "projector"
    batches = [{k: t.to(args.device) for k, t in b.items()} for b in batches_for(part, load_config(args.ckpt),
                                                                                  args.tiny)]
    model, opt, info = setup(args.worker, args, batches)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    walls, losses, sizes = [], [], None
    for i in range(args.warmup + args.steps):
        b = batches[i % len(batches)]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        parts = micro_batches(args.worker, b)
        loss = 0.0
        for mb in parts:
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
                part_loss = model(**mb).loss / len(parts)
            part_loss.backward()
            loss = loss + part_loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i == args.warmup + args.steps - 1:
            sizes = state_bytes(model, opt)          # grads still allocated: what a step holds
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
        losses.append(float(loss.detach().float()))
    med = statistics.median(walls[args.warmup:])
    tokens = int(batches[0]["attention_mask"].sum())
    row = {"variant": args.worker, **info, **sizes, "step_s_median": med, "tokens_per_step": tokens,
           "tokens_per_s": tokens / med, "first_step_s": walls[0], "losses": losses}
    if cuda:
        row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB

    def sync():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def one_step(b):
        forward = backward = 0.0
        parts = micro_batches(args.worker, b)
        for mb in parts:
            t0 = sync()
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
                loss = model(**mb).loss / len(parts)
            t1 = sync()
            loss.backward()
            t2 = sync()
            forward, backward = forward + t1 - t0, backward + t2 - t1
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t3 = sync()
        opt.step()
        t4 = sync()
        opt.zero_grad(set_to_none=True)
        return {"forward": forward, "backward": backward, "clip": t3 - t2, "optimizer": t4 - t3}

    # where one step's time goes (an extra step, synchronized between phases, after the timed ones)
    row["phases_s"] = {k: round(v, 5) for k, v in one_step(batches[0]).items()}
    if args.profile:
        row["profile"] = profile_table(lambda: one_step(batches[0]), cuda)
    if not row.get("compiled_layers"):
        # eager layers: does checkpointing really recompute? (a hook inside a compiled layer would
        # change its graph, so compiled rows leave this out)
        row["decoder_layer_calls_per_forward"] = layer_calls(model, lambda: one_step(batches[0]),
                                                             len(micro_batches(args.worker, batches[0])))
    return row


def layer_calls(model, step, forwards: int) -> float:
    """Calls of the first language decoder layer per forward over one ``step``: 1 without gradient
    checkpointing, 2 with it (the forward, then its recompute in backward)."""
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    calls = []
    # a pre-hook: a non-reentrant recompute stops early, before the layer's forward returns
    handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        step()
    finally:
        handle.remove()
    return len(calls) / forwards


def profile_table(fn, cuda: bool, rows: int = 30) -> str:
    """torch.profiler's table of one call of ``fn``: the ops that took the most device (or CPU) time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# --------------------------------------------------------------------------- driver

def run_sub(argv: list[str], names: list[str], timeout: int) -> dict[str, dict]:
    """One subprocess running ``argv``; the result of each of ``names`` (the build and / or the
    variants it runs), an error for each that printed none."""
    try:
        p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout)
        found = {r.pop("name"): r for r in (json.loads(line[7:]) for line in p.stdout.splitlines()
                                            if line.startswith("RESULT "))}
        missing = {"error": f"exit {p.returncode}", "tail": (p.stdout + p.stderr)[-3000:]}
    except subprocess.TimeoutExpired:
        found, missing = {}, {"error": f"timed out after {timeout} s"}
    return {n: found.get(n, missing) for n in names}


def run_in_child(args) -> None:
    """The subprocess side: the build (``--build``) and / or each variant of ``--worker a,b,...`` in
    turn, one ``RESULT`` line each (a variant that raises reports its traceback, the next still runs)."""
    import traceback

    if args.build:
        print("RESULT " + json.dumps({"name": "build", **build(args)}), flush=True)
    for v in args.worker.split(",") if args.worker else []:
        args.worker = v
        try:
            r = worker(args)
        except Exception:
            r = {"error": "raised", "tail": traceback.format_exc()[-3000:]}
        print("RESULT " + json.dumps({"name": v, **r}), flush=True)


def ratios(part: str, rows: dict) -> dict:
    """ours/base for each of our variants against each baseline that ran: speed = base's step time /
    ours (every variant of a part runs the same tokens per step), bytes per parameter, peak memory."""
    out = {}
    for k, name in enumerate(OURS[part]):
        ours = rows.get(name)
        if ours is None or "error" in ours:
            continue
        for base in BASELINES[part]:
            if base not in rows or "error" in rows[base]:
                continue
            r = {"speed": rows[base]["step_s_median"] / ours["step_s_median"],
                 "bytes_per_param": ours["bytes_per_param"] / rows[base]["bytes_per_param"]}
            if "peak_alloc_gib" in ours:
                r["peak_memory"] = ours["peak_alloc_gib"] / rows[base]["peak_alloc_gib"]
            out[f"{'ours' if k == 0 else name}/{base}"] = r
    return out


def markdown(data: dict) -> str:
    lines = [f"# Training modes: vlmtune vs Hugging Face ({data['device']})", ""]
    for part, res in data["parts"].items():
        t = TARGETS.get(part, {"speed": "-", "memory": "-"})
        lines += [f"## {part} ({res['model']}{', tiny' if data['tiny'] else ''})", "",
                  "| variant | optimizer | checkpointing, micro-batch | tokens/s | step ms | peak GiB | bytes/param (w+g+opt) |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for v, r in res["rows"].items():
            if "error" in r:
                lines.append(f"| {v} | error: {r['error']} | | | | | |")
                continue
            tps = "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}"
            gc = {True: "on", False: "off"}.get(r.get("gradient_checkpointing"), "-")
            gc += f", {r['micro_batch']}" if r.get("micro_batch") else ""
            lines.append(f"| {v} | {r.get('optimizer', '')} | {gc} | {tps} | "
                         f"{r['step_s_median'] * 1e3:.1f} | {r.get('peak_alloc_gib', float('nan')):.2f} | "
                         f"{r['bytes_per_param']:.2f} |")
        lines.append("")
        for k, r in res["ratios"].items():
            lines.append(f"- {k}: speed {r['speed']:.2f}× (target ≥ {t['speed']}×), bytes/param "
                         f"{r['bytes_per_param']:.2f}×" + (f", peak memory {r['peak_memory']:.2f}×"
                                                           if "peak_memory" in r else "")
                         + f" (target ≤ {t['memory']}×)")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="full,projector,optim")
    ap.add_argument("--variants", default=None, help="comma list (default: every variant of the parts)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--timeout", type=int, default=300, help="seconds per subprocess")
    ap.add_argument("--profile", action="store_true",
                    help="add torch.profiler's top ops of one step to each row (JSON 'profile', printed)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    _importable_vlm()
    if args.worker or args.build:
        run_in_child(args)
        return 0

    work = Path(tempfile.mkdtemp(prefix="train_modes_"))
    data = {"device": args.device, "tiny": args.tiny, "steps": args.steps, "warmup": args.warmup, "parts": {}}
    if args.device.startswith("cuda"):
        import torch

        data["device"] = torch.cuda.get_device_name()
    wanted = args.variants.split(",") if args.variants else None
    parts = args.parts.split(",")
    # one part per invocation (a device call is limited in time) gets its own file: train_modes_full.json
    stem = ("train_modes" + ("" if set(parts) == set(PARTS) else "_" + "_".join(parts))
            + ("_tiny" if args.tiny else ""))
    failed = False
    for part in parts:
        ckpt = work / MODEL[part]
        common = (["--device", args.device, "--ckpt", str(ckpt), "--part", part,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
                  + (["--profile"] if args.profile else []))
        t = time.perf_counter()
        names = [v for v in PARTS[part] + EXTRA.get(part, ())
                 if (v in wanted if wanted else v in PARTS[part])]
        build_first = not (ckpt / "config.json").is_file()     # part optim reuses part full's checkpoint
        # each variant in its own process (peak memory, compile caches: nothing carried over); --tiny
        # runs a part's build and variants in one process (CPU: no device memory to keep apart, and
        # the ~5 s of imports per process were most of the smoke run)
        groups = [names] if args.tiny else ([[]] if build_first else []) + [[v] for v in names]
        rows = {}
        for i, group in enumerate(groups):
            with_build = build_first and i == 0
            argv = (["--build"] if with_build else []) + (["--worker", ",".join(group)] if group else []) + common
            results = run_sub(argv, (["build"] if with_build else []) + group, args.timeout * max(1, len(group)))
            if with_build:
                b = results.pop("build")
                if "error" in b:
                    print(f"[{part}] build failed: {b}")
                    return 1
                print(f"[{part}] built {MODEL[part]} ({b['parameters'] / 1e9:.2f} B parameters) in "
                      f"{time.perf_counter() - t:.0f} s" + (" with its variants" if group else ""), flush=True)
            rows.update(results)
        for v in names:
            r = rows[v]
            failed |= "error" in r
            print(f"[{v}] " + (f"FAILED {r['error']}\n{r.get('tail', '')}" if "error" in r else
                               f"{r['tokens_per_s'] or 0:,.0f} tok/s, {r['step_s_median'] * 1e3:.1f} ms/step, peak "
                               f"{r.get('peak_alloc_gib', 0):.2f} GiB, {r['bytes_per_param']:.2f} B/param"
                               + (f", loss {r['losses'][0]:.4f} → {r['losses'][-1]:.4f}" if "losses" in r
                                  else "")
                               + ("; phases ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["phases_s"].items())
                                  if "phases_s" in r else "")), flush=True)
            if r.get("profile"):
                print(r["profile"], flush=True)
        data["parts"][part] = {"model": MODEL[part], "rows": rows, "ratios": ratios(part, rows)}
        for dst in {Path(args.out), Path(os.environ.get("OUT", args.out))}:
            dst.mkdir(parents=True, exist_ok=True)
            (dst / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
            (dst / f"{stem}.md").write_text(markdown(data))
    print(markdown(data))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
