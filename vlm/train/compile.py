"""``torch.compile`` the language decoder layers: one fused graph per layer instead of ~300 launches.

Why: a LoRA training step of a 2B VLM is launch-bound, not matmul-bound. Each decoder layer in eager
mode issues a few hundred small kernels (PEFT's per-adapter dropout/scale/add for 7 adapters, RMSNorm,
RoPE, SwiGLU, residual adds, autocast casts) and gradient checkpointing issues them all again; on an
H100 at Qwen2-VL-2B shapes the GPU idled ~60 % of each step waiting for Python (benchmarks/NOTES.md).
Compiling each layer turns the elementwise glue into a few generated Triton kernels and the launch
path into one call of a compiled graph.

How (nothing of transformers or PEFT is edited):
- every module of ``family.language_layers`` gets ``nn.Module.compile`` (its ``_call_impl`` is
  compiled; identical layers share one compiled graph, guarded on shapes and dtypes);
- gradient checkpointing: HF wraps ``Module.__call__`` of each layer in a checkpoint, which would run
  the compiled layer again from Python in backward; instead the checkpoint is moved inside the
  compiled call (``checkpoint_inside``), so dynamo sees it and the backward graph does the recompute;
- the layer-level Triton kernels of ``vlm.kernels`` (RMSNorm, RoPE, SwiGLU) are left off inside
  compiled layers: inductor generates and fuses that elementwise work itself (with its neighbours:
  residual adds, LoRA scale-and-add), and our RoPE dispatch is thread-local Python that dynamo would
  break the graph on. NF4 base linears go through our ``vlm::nf4_linear`` custom op instead of the
  fused NF4+LoRA Function: one opaque op per linear whose backward re-dequantizes, so the compiled
  graph can neither break on it nor keep dequantized weights alive (traced through bitsandbytes, the
  partitioner saved every deq(W): +4 GiB at 2B). LoRA's own matmuls stay in the graph.
  The fused linear cross-entropy sits outside the layers and stays ours.
- the frozen vision tower's blocks (``compile_vision_blocks``): inference graphs, one for all blocks,
  each block whole in every family. Two things would break them, and neither is edited: Qwen towers
  split attention per image by data-dependent lengths (``vlm.vision_attention`` batches them into one
  SDPA with precomputed indices), and transformers' output-capturing hooks (LLaVA's and Mistral 3's
  tower is asked for hidden states) read a ``ContextVar`` that dynamo cannot trace. So a block's
  ``forward`` is compiled rather than its ``__call__``: the block's own hook runs eagerly around the
  graph, and for the hooks of modules inside it the collector is read once outside the graph and handed
  in through transformers' ``CompileableContextVar`` compile slot (``_collector_handed_in``);
- ``chunk_mlps``: each layer's MLP over n token blocks, so the compiled backward holds ~1/n of its
  (tokens × intermediate) tensors at once (``training.mlp_chunks``);
- ``mode="reduce-overhead"`` (``training.cuda_graphs``): each compiled layer replays a CUDA graph per
  input shape, removing the host's per-launch cost that bounds a small model's compiled step.
- the sizes that change from batch to batch are dynamic from the first compile
  (``_dynamic_token_dims``): the token count (packed row length, a tower's patch count) wherever it
  appears in a layer's or block's inputs, and the length of 1-D integer inputs (segment boundaries).
  Left to torch's default, the first shape compiles static and the next recompiles dynamic — at a
  step that depends on the data. With several processes each sees different rows, so each
  recompiled at a different step and the others waited for it at the next collective (2 x H200,
  compiled DDP: 0.95x one GPU, benchmarks/NOTES.md). Marked up front, every process compiles its
  graphs in the first step and none later (unless a batch brings a new dtype or a new number of
  dimensions). The steady state is unchanged: after its recompile the default runs the same
  dynamic-length graph.

The math does not change: the compiled layer computes the same function; its float results differ
from eager's only by the order of floating-point operations inside fused kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm.errors import VlmError


def language_layers(model: nn.Module, family) -> nn.ModuleList:
    """The ModuleList of decoder layers (``family.language_layers``) in ``model`` or a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        layers = base.get_submodule(family.language_layers)
    except AttributeError as e:
        raise ValueError(f"{family.name}: no decoder layers at {family.language_layers!r}: {e}") from None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{family.name}: {family.language_layers!r} is {type(layers).__name__}, "
                         "not a non-empty ModuleList of decoder layers")
    return layers


def _checkpointed_call(self, *args, **kwargs):
    # non-reentrant activation checkpointing traced *inside* the compiled graph: dynamo turns it into
    # a checkpoint region, so the backward graph recomputes what it needs (one graph per direction)
    return torch.utils.checkpoint.checkpoint(self._vlm_uncheckpointed_forward, *args, use_reentrant=False,
                                             **kwargs)


def _chunked_mlp_forward(self, x, *args, **kwargs):
    # MLP(x) row by row is MLP over token blocks, concatenated: same numbers, smaller live set
    n = self._vlm_mlp_chunks
    rows = x.reshape(-1, x.shape[-1])
    if n <= 1 or rows.shape[0] < n:
        return self._vlm_mlp_forward(x, *args, **kwargs)
    out = [self._vlm_mlp_forward(part, *args, **kwargs) for part in rows.chunk(n)]
    return torch.cat(out).reshape(*x.shape[:-1], out[0].shape[-1])


def chunk_mlps(model: nn.Module, family, chunks: int) -> int:
    """Run each decoder layer's MLP over ``chunks`` token blocks (``mlp`` child of the layer).

    The MLP acts on each token alone, so MLP(x) = cat(MLP(x_1), …, MLP(x_c)) over row blocks x_i of
    the (tokens, hidden) input: the same function. Inside a compiled, checkpointed layer the backward
    graph recomputes and differentiates one block at a time, so the (tokens × intermediate) tensors
    it holds at once (gate, up, their product and gradients: ~6 × 4096 × 8960 × 2 B at Qwen2-VL-2B's
    W) shrink by ~``chunks``×. Returns the number of MLPs changed; ``chunks`` ≤ 1 restores them."""
    from types import MethodType

    n = 0
    for layer in language_layers(model, family):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            continue
        if "_vlm_mlp_forward" not in mlp.__dict__:
            if chunks <= 1:
                continue
            mlp._vlm_mlp_forward = mlp.forward
            mlp.forward = MethodType(_chunked_mlp_forward, mlp)
        mlp._vlm_mlp_chunks = int(chunks)
        n += 1
    return n


def _mark_token_dims(args: tuple, kwargs: dict) -> None:
    """``torch._dynamo.maybe_mark_dynamic`` on the sizes that vary between batches (module doc): the
    hidden states' token dimension (``shape[-2]``: (batch, tokens, hidden) or a tower's (patches,
    hidden)), every dimension of that size in the other tensor inputs (position tables, masks,
    position ids), and the length of 1-D integer tensors (cumulative segment boundaries). maybe_: a
    dimension the graph must specialize stays static instead of failing."""
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.ndim < 2:
        return
    n = hidden.shape[-2]
    mark = torch._dynamo.maybe_mark_dynamic
    mark(hidden, hidden.ndim - 2)

    def visit(x, depth=0):
        if isinstance(x, torch.Tensor):
            if x is hidden:
                return
            if x.ndim == 1 and not x.is_floating_point() and x.numel() > 1 and x.numel() != n:
                mark(x, 0)   # segment boundaries: one more entry per sample / image
            for d, size in enumerate(x.shape):
                if size == n:
                    mark(x, d)
        elif depth < 2 and isinstance(x, (tuple, list)):
            for y in x:
                visit(y, depth + 1)
        elif depth < 2 and isinstance(x, dict):
            for y in x.values():
                visit(y, depth + 1)

    visit(args[1:])
    visit(kwargs)


def _dynamic_tokens_call(compiled, *args, **kwargs):
    # eager, before the compiled call: marks must be on the inputs when dynamo first sees them
    _mark_token_dims(args, kwargs)
    return compiled(*args, **kwargs)


def compile_language_layers(model: nn.Module, family, *, backend: str = "inductor", mode: str | None = None,
                            dynamic: bool | None = None, checkpoint_inside: bool = True) -> int:
    """Compile each language decoder layer of ``model`` in place; returns how many were compiled.

    ``checkpoint_inside``: a layer that HF checkpoints (``layer.gradient_checkpointing``) gets the
    checkpoint moved inside its compiled call: the forward graph keeps only the layer's inputs and
    the backward graph recomputes the rest, instead of HF's checkpoint running the compiled forward a
    second time from Python. ``mode="reduce-overhead"`` replays each compiled graph from a CUDA graph.
    ``dynamic=None``: the varying sizes are marked dynamic before the first compile
    (``_dynamic_tokens_call``), so later lengths reuse the first graph instead of recompiling at a
    data-dependent step; True/False are torch's (every size dynamic / every size static).
    Idempotent: layers compiled already are left as they are.
    """
    from functools import partial
    from types import MethodType

    layers = language_layers(model, family)
    n = 0
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is not None:
            continue
        if checkpoint_inside and getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False          # HF's wrapper off: ours runs in the graph
            layer._vlm_uncheckpointed_forward = layer.forward
            layer.forward = MethodType(_checkpointed_call, layer)
        layer.compile(backend=backend, mode=mode, dynamic=dynamic)
        if dynamic is None:   # Module.__call__ calls _compiled_call_impl: mark the inputs, then the graph
            layer._compiled_call_impl = partial(_dynamic_tokens_call, layer._compiled_call_impl)
        n += 1
    _make_room(n)
    _keep_ddp_reducer()
    return n


def drop_cuda_graphs(model: nn.Module, family, *, backend: str = "inductor") -> int:
    """Compile the language layers again without CUDA graphs (``vlm.train.graph_steps``' fallback);
    returns how many. ``torch._dynamo.reset`` drops every compiled graph and the CUDA-graph trees
    with their memory pool; the vision blocks then recompile on their next call (from inductor's
    caches). The checkpoint stays inside each layer's call (``checkpoint_inside`` already moved it)."""
    torch._dynamo.reset()
    for layer in language_layers(model, family):
        layer._compiled_call_impl = None
    return compile_language_layers(model, family, backend=backend, mode=None)


def layers_replay_cuda_graphs(model: nn.Module, family) -> bool:
    """Whether every compiled language layer was compiled with CUDA graphs (inductor's
    ``triton.cudagraphs``, which ``mode="reduce-overhead"`` turns on)."""
    def graphs(layer) -> bool:
        call = getattr(layer, "_compiled_call_impl", None)
        call = call.args[0] if isinstance(getattr(call, "args", None), tuple) and call.args else call
        config = call.get_compiler_config() if hasattr(call, "get_compiler_config") else None
        return bool((config or {}).get("triton.cudagraphs"))

    return all(graphs(layer) for layer in language_layers(model, family))


def _keep_ddp_reducer() -> None:
    """Compile our per-layer graphs as they are under DDP too.

    While DDP's forward runs, dynamo hands every graph it compiles to its ``DDPOptimizer``, which is
    meant for a whole model compiled as one graph: it re-splits the graph at DDP's bucket boundaries
    so the all-reduce of one bucket can overlap the backward of the next. Our graphs are one decoder
    layer (or vision block) each and DDP's C++ reducer already overlaps at layer granularity, so the
    split can only add graphs and launches. ``optimize_ddp = False`` is dynamo's "no_optimization"
    mode: graphs compile unsplit, the reducer does the overlap. In one process nothing changes.
    (Not what held compiled DDP back on 2 × H200 — 0.87× one GPU before, 0.95× after; that was
    ranks recompiling at different steps inside the timing window: benchmarks/NOTES.md.)"""
    torch._dynamo.config.optimize_ddp = False


def _make_room(n_modules: int) -> None:
    """Raise dynamo's recompile limits by room for ``n_modules`` more compiled modules.

    Identical modules share one graph, but each compiled module is its own cache entry on
    ``Module._call_impl``'s one code object (language layers and vision blocks alike): past the
    limit dynamo silently runs the rest eager. Room: each module plus one dynamic-shape recompile."""
    if n_modules <= 0:
        return
    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 8) + 2 * n_modules
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * cfg.cache_size_limit)


def vision_blocks(model: nn.Module, family) -> list[nn.Module]:
    """The vision transformer blocks the family names (``family.vision_blocks``: every path that
    exists in this model, in order; transformers versions nest some towers differently)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks: list[nn.Module] = []
    for path in family.vision_blocks:
        try:
            blocks.extend(base.get_submodule(path))
        except AttributeError:
            continue
    if family.vision_blocks and not blocks:
        raise VlmError(f"family {family.name}: no vision blocks at any of {', '.join(family.vision_blocks)}")
    return blocks


def _output_collector():
    """transformers' output-capturing collector (a ``CompileableContextVar``), or None where this
    transformers has none."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    var = getattr(output_capturing, "_active_collector", None)
    return var if all(hasattr(var, a) for a in ("context_var", "global_var", "compiling")) else None


def _collector_handed_in(compiled, *args, **kwargs):
    """Call ``compiled`` with transformers' output collector readable inside the graph.

    The output-capturing hooks call ``_active_collector.get()``; eagerly that reads a ContextVar, which
    dynamo cannot trace (a graph break in every block). transformers' ``CompileableContextVar`` has a
    mode for compiled code: while ``compiling`` is set, ``get()`` returns ``global_var``, a plain
    attribute dynamo traces and guards on. Here the ContextVar is read eagerly, put in that slot for
    the compiled call, and the slot cleared after: the hooks inside see exactly what they would have
    seen eagerly. The slot is process-global during the call, as in transformers' own compiled mode
    (vlm runs a model from one thread)."""
    var = _output_collector()
    if var is None or var.compiling:
        return compiled(*args, **kwargs)
    var.global_var, var.compiling = var.context_var.get(), True
    try:
        return compiled(*args, **kwargs)
    finally:
        var.global_var, var.compiling = None, False


def compile_vision_blocks(model: nn.Module, family, *, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile each vision transformer block's ``forward`` (frozen towers run them under no_grad:
    inference graphs); returns how many were compiled. Idempotent.

    The forward, not ``__call__``: hooks registered on the block itself (transformers' hidden-state
    capture) stay eager around the graph; those on modules inside it read the output collector handed
    in by ``_collector_handed_in``. Identical blocks share one graph."""
    from functools import partial

    n = 0
    for block in vision_blocks(model, family):
        if "_vlm_eager_forward" in block.__dict__:
            continue
        block._vlm_eager_forward = block.forward
        compiled = partial(_dynamic_tokens_call, torch.compile(block.forward, backend=backend, mode=mode))
        block.forward = partial(_collector_handed_in, compiled)
        n += 1
    _make_room(n)
    _keep_ddp_reducer()
    return n


def start_compile_workers(device) -> bool:
    """Start inductor's Triton compile workers now, on a GPU; returns whether a pool is starting.

    Inductor compiles (and, from its caches, reloads) a graph's Triton kernels in a pool of worker
    processes, but only once the pool reports ready; until then every kernel is built one after the
    other in this process. It starts the pool itself at the first graph, and each worker first
    imports torch (seconds: the device's imports took 15-20 s for this process). Started here, before
    the model loads, the workers boot during the load, the analysis and the data planning, and the
    first step finds them ready. The same pool and the same kernels (``maybe_warm_pool``: inductor's
    own early start, honouring ``TORCHINDUCTOR_COMPILE_THREADS`` and ``TORCH_WARM_POOL``)."""
    if not str(device).startswith("cuda"):
        return False
    try:
        from torch._inductor.async_compile import AsyncCompile, maybe_warm_pool
    except ImportError:   # pragma: no cover - a torch without the async compile pool
        return False
    maybe_warm_pool()
    return getattr(AsyncCompile, "_ready_future", None) is not None


def compile_workers_ready() -> bool | None:
    """Whether inductor's compile pool is up (None: never started in this process)."""
    try:
        from torch._inductor.async_compile import AsyncCompile
    except ImportError:   # pragma: no cover
        return None
    future = getattr(AsyncCompile, "_ready_future", None)
    return None if future is None else future.done()


def is_compiled(model: nn.Module, family) -> bool:
    return all(getattr(layer, "_compiled_call_impl", None) is not None
               for layer in language_layers(model, family))


def kernel_patch_options(compiled: bool) -> dict[str, Any]:
    """``vlm.kernels.patch`` keyword arguments that go with (un)compiled layers (see module doc)."""
    if not compiled:
        return {}
    return {"rms_norm": False, "rope": False, "swiglu": False, "nf4_lora": False, "nf4_linear": True}
