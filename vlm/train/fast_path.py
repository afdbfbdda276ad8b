"""What `vlm train` does to make the step fast, resolved from the config in one place.

    resolve(cfg, device, strategy) -> Plan        compile on/off, CUDA graphs, batch padding
    apply(model, family, cfg, plan, lengths) -> Applied

Applied after LoRA (so NF4 base + LoRA linears can be fused) and in this order: the batched vision
attention (exact: same math, one SDPA per block; ``vlm.vision_attention``), ``vlm.kernels.patch``
(options matching compiled or eager layers), then, when compiling (``vlm.train.compile``), the
frozen vision blocks, the language layers (CUDA graphs with ``training.cuda_graphs``) and the MLP
token blocks (``training.mlp_chunks``). Every choice is printed and returned for summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlm.errors import ConfigError


@dataclass(frozen=True)
class Plan:
    compiled: bool       # training.compile resolved
    cuda_graphs: bool    # training.cuda_graphs, where compile is on
    pad_to: int          # the collator pads every batch to a multiple of this


@dataclass
class Applied:
    vision_attention_batched: int = 0
    kernels: Any = None            # vlm.kernels PatchReport, or None with kernels: false
    compiled_vision_blocks: int = 0
    compiled_layers: int = 0
    mlp_chunks: int = 1


def compile_wanted(setting, device: str, strategy: str, *, method: str = "lora", quantized: bool = False) -> bool:
    """training.compile resolved: ``auto`` = CUDA, and under FSDP only where a GPU measurement showed
    the compiled FSDP2 step faster; ``true`` compiles under FSDP2 too.

    Under FSDP2 the compiled layers are the FSDP units: dynamo leaves FSDP2's pre/post-forward hooks
    (all-gather, reshard) out of the graph (``torch._dynamo.config.skip_fsdp_hooks``) and compiles
    the layer between them (2 gloo CPU processes train the tiny Qwen2-VL to the eager losses:
    tests/vlm/train/test_compile_fsdp.py). Measured on 2 × H200 (benchmarks/results/
    multi_gpu_packed_2b_NVIDIA_H200.md): 16-bit LoRA at Qwen2-VL-2B, FSDP2 compiled 38,070 tokens/s
    against 20,836 eager — so ``auto`` compiles there. 4-bit weights (QLoRA) and methods full /
    projector under FSDP2 have no GPU measurement compiled: ``auto`` keeps them eager."""
    if setting == "auto":
        if not str(device).startswith("cuda"):
            return False
        return strategy != "fsdp" or (method == "lora" and not quantized)
    return bool(setting)


def resolve(cfg, device: str, strategy: str) -> Plan:
    compiled = compile_wanted(cfg.training.compile, device, strategy, method=cfg.method,
                              quantized=_quantized(cfg.quant))
    if compiled and cfg.training.cuda_graphs and strategy == "fsdp":
        # a CUDA graph replays fixed addresses; FSDP2 gathers each unit's weights into fresh buffers
        # at every step (outside the compiled graph)
        raise ConfigError("training.cuda_graphs: not with distributed.strategy fsdp (FSDP2 re-gathers "
                          "weights into new buffers each step); use compile without cuda_graphs, or ddp")
    cuda_graphs = compiled and cfg.training.cuda_graphs
    # CUDA graphs replay one recorded shape: every batch padded to max_length (samples never exceed it)
    pad_to = cfg.data.max_length if cuda_graphs else (cfg.data.pad_to_multiple_of or 1)
    if cfg.training.cuda_graphs and not compiled:
        print("warning: training.cuda_graphs replays compiled layers and compile is off here "
              f"(training.compile: {cfg.training.compile} on {device}): ignored")
    if cfg.training.mlp_chunks > 1 and not compiled:
        print("warning: training.mlp_chunks applies to compiled layers only (compile is off here): "
              "eager checkpointing recomputes the whole layer at once, so the MLP runs in one block")
    return Plan(compiled=compiled, cuda_graphs=cuda_graphs, pad_to=pad_to)


def apply(model, family, cfg, plan: Plan, lengths: list[int], device=None, clock=None) -> Applied:
    """``device``: where the model will train when it is staged elsewhere now (FSDP: host memory,
    each unit moved to its GPU as it is sharded: ``vlm.train.distributed.staging_device``).
    ``clock``: a ``vlm.train.startup_clock.StepClock`` that times each step below for the startup
    report (``vision_attention``, ``kernels``, ``compile_setup``)."""
    from vlm.train.no_kv_cache import disable_kv_cache
    from vlm.vision_attention import batch_equal_images

    mark = clock.mark if clock is not None else (lambda step: None)
    # every method, compiled or not: a training forward builds no KV cache (vlm.train.no_kv_cache;
    # with one, each compiled layer compiled its own graph). The one place: vlm train, train_step.py
    # and train_modes.py all set a model up through this function
    disable_kv_cache(model)
    done = Applied(vision_attention_batched=batch_equal_images(model, family))
    mark("vision_attention")
    if cfg.kernels:
        from vlm.kernels import patch
        from vlm.train.compile import kernel_patch_options

        done.kernels = patch(model, family, device=device, **kernel_patch_options(plan.compiled))
        mark("kernels")
    if not plan.compiled:
        return done
    from vlm.train.compile import chunk_mlps, compile_language_layers, compile_vision_blocks

    warning = compile_memory_warning(model, kernels=cfg.kernels)
    if warning:
        print(f"warning: {warning}")
    if not vision_trains(model, family):
        # frozen towers: every family's blocks trace whole (Qwen towers with the batched attention
        # above; transformers' output-capturing hooks kept out of the graph: vlm.train.compile)
        done.compiled_vision_blocks = compile_vision_blocks(model, family)
    n_layers = done.compiled_layers = compile_language_layers(
        model, family, mode="reduce-overhead" if plan.cuda_graphs else None)
    print(f"torch.compile: {n_layers} language decoder layers"
          + (f", {done.compiled_vision_blocks} frozen vision blocks" if done.compiled_vision_blocks else "")
          + " (compiled on the first step)"
          + (f"; CUDA graphs, {graph_shapes(cfg, plan)}" if plan.cuda_graphs else ""))
    if plan.cuda_graphs and not cfg.data.max_tokens_per_batch:
        print(padding_note(lengths, plan.pad_to))
    print(compile_cache_line())
    done.mlp_chunks = cfg.training.mlp_chunks
    if done.mlp_chunks > 1:
        chunk_mlps(model, family, done.mlp_chunks)
        print(f"MLP over {done.mlp_chunks} token blocks in each compiled layer (training.mlp_chunks)")
    mark("compile_setup")
    return done


def compile_cache_line() -> str:
    """Where compiled graphs and kernels are cached: a second run of the same config loads them
    instead of compiling (its first step then costs dynamo's tracing and the cache loads)."""
    from vlm.train.startup_clock import cache_dirs, watch_cache_bypasses

    watch_cache_bypasses()   # the first step's report says why a graph could not be cached
    c = cache_dirs()
    on = [name for name, key in (("FX graph", "fx_graph_cache"), ("AOTAutograd", "aot_autograd_cache")) if c.get(key)]
    return (f"compile caches: inductor {c.get('inductor')} ({' + '.join(on) or 'graph caches off'}), "
            f"Triton {c.get('triton')}")


def graph_shapes(cfg, plan: Plan) -> str:
    """What shapes the CUDA graphs are recorded for."""
    if cfg.data.max_tokens_per_batch:
        return f"rows of data.max_tokens_per_batch={cfg.data.max_tokens_per_batch} tokens"
    return f"every batch padded to {plan.pad_to} tokens"


def padding_note(lengths: list[int], pad_to: int) -> str:
    """How much of what CUDA-graph training computes is padding (every sample padded to ``pad_to``)."""
    mean = sum(lengths) / max(len(lengths), 1)
    share = 1 - mean / pad_to
    note = (f"training.cuda_graphs: samples average {mean:.0f} of {pad_to} tokens, so {share:.0%} of the "
            "tokens computed are padding")
    if share > 0.5:
        note = "warning: " + note + "; a data.max_length nearer the longest sample (or cuda_graphs: false) saves it"
    return note


def vision_trains(model, family) -> bool:
    """Whether any parameter of the vision tower's blocks is trainable (LoRA, modules_to_save or
    ``training.train_vision`` on them). A projector inside the tower (Qwen2-VL's merger, trained by
    ``method: full``) does not count: the frozen blocks before it get inputs that need no grad
    (pixels; transformers' input-grad hook on the patch embedding is left off by vlm.train.modes), so
    autograd records nothing there and their compiled graphs are inference graphs, as in a frozen
    tower. (Before, a trained merger kept Qwen2-VL's whole tower eager in method: full.)"""
    from vlm.train.compile import vision_blocks as blocks_of

    blocks = blocks_of(model, family)
    if not blocks:
        return any(p.requires_grad for _, root in family.component_roots(model, "vision") for p in root.parameters())
    return any(p.requires_grad for block in blocks for p in block.parameters())


def quantized_language(model) -> int:
    """How many language linears of ``model`` are 4-bit (0 for a 16-bit model)."""
    from vlm.quant.loading import quant_metadata

    quantized = ((quant_metadata(model) or {}).get("counts") or {}).get("quantized") or {}
    return int(quantized.get("language") or 0)


def compile_memory_warning(model, *, kernels: bool) -> str | None:
    """Compiled layers over 4-bit language linears without our nf4_linear op keep deq(W) alive."""
    if kernels or not quantized_language(model):
        return None
    return ("training.compile with kernels: false on a 4-bit model: compiled layers trace bitsandbytes, "
            "whose dequantized weights are then kept for backward (about the 16-bit size of every "
            "quantized layer); kernels: true routes them through vlm::nf4_linear")


def _quantized(spec) -> bool:
    """Whether the quant policy ``spec`` stores any weight in 4/8 bits (unparseable: counted as yes, the
    cautious side for ``compile_wanted``; the load reports the bad spec itself)."""
    if spec in (None, False, "none", "bf16", "fp16"):
        return False
    from vlm.quant.policy import load_policy

    try:
        return load_policy(spec).quant_kind is not None
    except Exception:   # a malformed policy: vlm.load raises the user-facing error moments later
        return True
