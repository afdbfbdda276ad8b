"""Propagated-error sensitivity: what quantizing one group does to the residual stream after its block.

The output KL (vlm.quant.sensitivity.output_sensitivity) runs the whole model once per fused-sibling
group: ~240 float32 forwards of Qwen2-VL-7B, minutes at load time. This measures the error where the
next block reads it, at the cost of about one block forward per group:

1. Blocks: the repeated units of the model, i.e. an element of an ``nn.ModuleList`` (a decoder
   layer, a vision block). A group outside every block (a projector's linear) takes its parent
   module instead (the projector's MLP: its output is what the language model reads), or the
   linear alone where that parent holds blocks itself or is the model.
2. One reference pass over the calibration batches, with hooks on those blocks, keeps each block's
   inputs (hidden states cloned; position embeddings, masks and cu_seqlens by reference) and its
   output h, in the analysis dtype (float32 by default: vlm.quant.sensitivity.upcast).
3. For each group g of block b: g's weights replaced by Ŵ = deq(q(W)) (bitsandbytes' functions, as
   for the KL), block b run again on its cached inputs — through its residual adds, so its output
   ĥ is the residual stream after b — then the following blocks of the same list, each on its
   cached input plus the change at the previous block's output (exact where the model adds
   something between blocks, as Qwen3-VL adds its DeepStack visual features) and its cached
   keyword inputs: the next k (``extend=k``; 0 = block b alone; the ``dynamic`` policy's default
   ``propagate: 3``) or all of them (``extend=None``, ``propagate: end``: the error as the
   stack's final norm sees it); with h the reference output of the last block run:

       E_g = mean_t ‖ĥ_t − h_t‖² / ‖h_t‖²          over every token t of every calibration batch

   Why this form. The next block reads h_t through a norm (RMSNorm / LayerNorm), which divides by
   the token's own scale: to first order its input changes by (ĥ_t − h_t)/rms(h_t), so E_g is the
   mean squared relative change of what the next norm sees ("the error propagated to the next
   norm", issue 17). Per token, so tokens with massive activations (a BOS at 100× the others'
   norm) do not drown the rest; squared, like the KL (to second order ½ δᵀFδ in the logits'
   change δ), so "10× the median" marks an outlier on the same footing in both rankings.
   Why to the end of the stack: an error made early grows through the blocks after it (attention
   patterns shift, later layers amplify it); measured at its own block only, a query/key/value
   group of decoder layer 0 ranked below layer 3's, the KL the other way round
   (benchmarks/results/quant_policies_demo_base_scenes_calib: 17 % of the KL gap closed at 1.15×
   NF4 with ``extend=0``, 20 % with 1, 36 % with 3 = the whole 4-layer stack — the KL's own pick
   and figure). Three blocks further, not the whole stack, by default: the near amplification is
   what changed the ranking there, and it keeps the cost at 4 blocks per group at any depth.

Exactness: with nothing quantized, re-running a block on its cached inputs gives its cached output
bit for bit (same kernels, same inputs), so E_g = 0 for a group whose quantization changes nothing.
Cost: one reference forward, then per group and batch 1 + k blocks (Qwen2-VL-7B, k = 3: 4 of a
decoder's 28 layers or of the vision tower's 32 blocks, ~1/15 of the KL's whole-model forwards;
no lm_head); ``propagate: end``: to the end of the stack (half of it on average, ~1/4 of the KL's);
``extend=0``: one block per group. Memory: every hooked block's input and output hidden states
(Qwen2-VL-7B, 4 samples × ~1,000 tokens, float32: ~3 GB).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm.quant.agreement import simulated
from vlm.quant.capture import move_batch
from vlm.quant.policy import DEFAULT_PROPAGATE


def block_of(name: str, modules: dict[str, nn.Module]) -> str:
    """The block holding linear ``name``: its deepest ancestor that is an element of a ModuleList;
    else its parent module (a projector's MLP), unless that parent holds blocks itself (Mllama's
    projector hangs on the model) or is the root: then the linear alone."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i - 1])
        if parts[i - 1].isdigit() and isinstance(modules.get(parent), nn.ModuleList):
            return ".".join(parts[:i])
    parent = ".".join(parts[:-1])
    if not parent or any(n.startswith(parent + ".") and isinstance(m, nn.ModuleList)
                         for n, m in modules.items()):
        return name
    return parent


def blocks_from(block: str, modules: dict[str, nn.Module], k: int | None) -> list[str]:
    """``block`` and up to ``k`` blocks after it in the same ModuleList (None: all of them)."""
    parent, _, idx = block.rpartition(".")
    lst = modules.get(parent)
    if not (idx.isdigit() and isinstance(lst, nn.ModuleList)):
        return [block]
    last = len(lst) - 1 if k is None else min(len(lst) - 1, int(idx) + k)
    return [f"{parent}.{j}" for j in range(int(idx), last + 1)]


def _first_tensor(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError(f"a block returned {type(out).__name__}, not hidden states")


def _hidden_key(block: str, args: tuple, kwargs: dict) -> str | None:
    """Where a block call passes its hidden states: None = first positional argument, else the
    keyword (``hidden_states``; Mllama's vision encoder says ``hidden_state``)."""
    if args and torch.is_tensor(args[0]):
        return None
    for key in ("hidden_states", "hidden_state"):
        if torch.is_tensor(kwargs.get(key)):
            return key
    raise TypeError(f"block {block} was called without hidden states as its first argument or "
                    f"as hidden_states=; keywords: {sorted(kwargs)}")


class BlockCache:
    """Inputs and outputs of blocks over the calibration batches: ``inputs[block][i] = (args,
    kwargs)``, ``outputs[block][i]`` = hidden states (batch i)."""

    def __init__(self, model: nn.Module, blocks: list[str]):
        self.modules = dict(model.named_modules())
        self.blocks = blocks
        self.inputs: dict[str, list] = {b: [] for b in blocks}
        self.outputs: dict[str, list] = {b: [] for b in blocks}

    def record(self, model: nn.Module, batches: list[dict]) -> None:
        handles = []
        for b in self.blocks:
            mod = self.modules[b]
            handles.append(mod.register_forward_pre_hook(self._pre(b), with_kwargs=True))
            handles.append(mod.register_forward_hook(self._post(b)))
        device = next(model.parameters()).device
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        try:
            with torch.no_grad():
                for batch in batches:
                    # no KV cache: a re-run block must not append to it
                    model(**move_batch(batch, device, dtype), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for b in self.blocks:
            if len(self.inputs[b]) != len(batches):
                raise RuntimeError(f"block {b} ran {len(self.inputs[b])} times on "
                                   f"{len(batches)} calibration batches")

    def _pre(self, block: str):
        def hook(module, args, kwargs):
            key = _hidden_key(block, args, kwargs)
            if key is None:
                args = (args[0].detach().clone(),) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, **{key: kwargs[key].detach().clone()})
            self.inputs[block].append((args, dict(kwargs)))
        return hook

    def _post(self, block: str):
        def hook(module, args, output):
            self.outputs[block].append(_first_tensor(output).detach().clone())
        return hook

    def hidden_in(self, block: str, i: int) -> torch.Tensor:
        args, kwargs = self.inputs[block][i]
        key = _hidden_key(block, args, kwargs)
        return args[0] if key is None else kwargs[key]

    def run(self, block: str, i: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``block`` on batch ``i``'s cached inputs (hidden states replaced by ``hidden``)."""
        args, kwargs = self.inputs[block][i]
        if hidden is not None:
            key = _hidden_key(block, args, kwargs)
            if key is None:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, **{key: hidden})
        return _first_tensor(self.modules[block](*args, **kwargs))


def sequential_part(chain: list[str], cache: BlockCache, n: int) -> list[str]:
    """The leading part of ``chain`` whose blocks read their predecessor's output: it ends before a
    block whose hidden-state input has another shape than the previous block's output. A ModuleList
    is not always a stack: Qwen3-VL's DeepStack mergers each read another vision layer's features
    (a projector candidate of the ``dynamic`` preset), so its group is measured at its own output."""
    out = chain[:1]
    for prev, b in zip(chain, chain[1:]):
        if any(cache.hidden_in(b, i).shape != cache.outputs[prev][i].shape for i in range(n)):
            break
        out.append(b)
    return out


def relative_error_sum(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(Σ_t ‖got_t − ref_t‖² / ‖ref_t‖², number of tokens t), tokens along the last axis."""
    d = got.float().reshape(-1, got.shape[-1])
    r = ref.float().reshape(-1, ref.shape[-1])
    per_token = (d - r).pow(2).sum(-1) / r.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return float(per_token.sum(dtype=torch.float64)), int(per_token.numel())


def propagated_sensitivity(model: nn.Module, groups: dict[str, dict[str, str]], batches: list[dict],
                           *, double_quant: bool = True, extend: int | None = DEFAULT_PROPAGATE
                           ) -> dict[str, float | None]:
    """{group: E_g} (see the module docstring); None for a group with no member to quantize."""
    modules = dict(model.named_modules())
    chains: dict[str, list[str]] = {}
    for g, precisions in groups.items():
        if precisions:
            chains[g] = blocks_from(block_of(next(iter(precisions)), modules), modules, extend)
    needed = sorted({b for chain in chains.values() for b in chain})
    cache = BlockCache(model, needed)
    cache.record(model, batches)
    chains = {g: sequential_part(chain, cache, len(batches)) for g, chain in chains.items()}
    out: dict[str, float | None] = {g: None for g in groups}
    with torch.no_grad():
        for g, chain in chains.items():
            total, count = 0.0, 0
            with simulated(model, groups[g], double_quant):
                for i in range(len(batches)):
                    h = cache.run(chain[0], i)
                    for prev, b in zip(chain, chain[1:]):
                        # the next block's cached input plus the change at the previous output:
                        # exact where what lies between them adds (Qwen3-VL's DeepStack features)
                        h = cache.run(b, i, cache.hidden_in(b, i) + (h - cache.outputs[prev][i]))
                    s, n = relative_error_sum(h, cache.outputs[chain[-1]][i])
                    total, count = total + s, count + n
            out[g] = total / max(count, 1)
    return out
