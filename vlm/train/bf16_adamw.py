"""AdamW for weights stored in bf16, without an fp32 master copy, whose small updates do not stall.

The math of one step (t = step count, g = gradient, all arithmetic in fp32 on the fly):

    m_t = β1·m + (1 − β1)·g                 v_t = β2·v + (1 − β2)·g²
    w_t = w·(1 − lr·λ) − lr · (m_t / (1 − β1^t)) / (√(v_t / (1 − β2^t)) + ε)

Why plain bf16 AdamW stalls: bf16 keeps 8 significant bits, so a weight moves only when its update
exceeds half a unit in the last place (|Δw| > 2⁻⁹·|w|). With lr 1e-5 and Adam's normalised step
≈ lr, a weight of magnitude 0.02 needs |Δw| > 4e-5: every update is rounded away and training
stops. The same holds for the states: v_t = 0.999·v + 0.001·g² changes v by 0.1 %, below bf16's
0.4 % resolution, so v neither grows nor decays. Two fixes, per weight tensor:

- ``rounding="stochastic"`` (default): the fp32 result x is written as one of its two bf16
  neighbours, the upper with probability (x − lower)/(upper − lower), so E[round(x)] = x and tiny
  updates accumulate in expectation. Done on the bit pattern: add a uniform random 16-bit integer
  to the fp32 bits, then clear the low 16 bits (truncation toward zero after the random carry).
  The random bits are a hash of (seed, step, tensor index, element index): a run resumed from a
  checkpoint draws the same bits as an uninterrupted one (resume is exact), and on a GPU the whole
  update of a tensor compiles into one kernel.
- ``rounding="kahan"``: a bf16 compensation buffer c holds what rounding dropped, so w + c carries
  ~16 significant bits: y = (w + c) + Δw; w ← bf16(y) (to nearest, ties to even); c ← bf16(y − w),
  stochastically rounded (c's own 8 bits would otherwise drop a steady small update the same way
  every step). y − w is exact in fp32, so w + c = y up to c's rounding. The weight the model sees
  lags y by at most half a bf16 spacing instead of a random walk; 2 more bytes per parameter. Both
  roundings are done on the bit pattern (``round_nearest``, ``stochastic_round``): a compiler that
  keeps bf16 values in fp32 (inductor's Triton code does) cannot skip them, and c is not silently 0.

The moments m and v are stored in ``state_dtype`` (default: the weight's dtype, bf16): their writes
are stochastically rounded too (unbiased, so v tracks g² instead of freezing); ``state_dtype=
torch.float32`` stores them exactly. Tensors with fewer than two dimensions (norm weights, biases:
a few thousandths of a model, but a loss curve is sensitive to them) keep an fp32 master copy and
fp32 moments in the optimizer state and are written back to the bf16 weight by round-to-nearest;
``fp32_master="all"`` does that for every tensor (a small trainable set such as a projector, where
exactness costs little memory).

Memory per bf16 parameter (weights + grads + optimizer): stochastic with bf16 moments 2 + 2 + 4 =
8 bytes; kahan 10; fp32 moments +4; ``state_dtype="8bit"`` (bitsandbytes' blockwise 8-bit codes,
decoded for the update and encoded after it) 2 + 2 + 2.03 = 6.03. transformers' Trainer with bf16 mixed precision keeps fp32
weights, grads and moments: 16 bytes. Parameters that are not bf16/fp16 get the plain fp32 AdamW
update above (this class is then torch's AdamW up to summation order).

FSDP2 (every parameter a ``DTensor``: this process's rows, ``Shard(0)``): AdamW is elementwise, so
each process updates its *local* rows with their local gradient (``p._local_tensor``, the same
storage, no copy) and keeps every state (moments, Kahan compensation, fp32 master, 8-bit blocks of
256 local elements) for those rows only: the optimizer's memory is divided by the process count.
The random bits of the stochastic rounding are keyed by the element's index in the *whole* tensor
(the shard's row offset), so a sharded step writes exactly what one process would for the same
gradient. Checkpoints: under FSDP2 ``state_dict`` hands out each state as a DTensor placed like its
parameter, which torch.distributed.checkpoint reshards from N to M processes and
``vlm.train.cross_resume`` reads whole. 8-bit moments go out as their codes plus each element's
block absmax (the blocks are cut per local shard, so a per-block absmax could not be resharded):
``load_state_dict`` copies codes and absmax when the new shard's blocks are the saved ones (the
same process count: bit-exact) and otherwise decodes and re-encodes them into the new blocks
(within the 8-bit resolution). It takes whole tensors too, and keeps what one process saved as it is.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable

import torch

_LOW16 = 0xFFFF
_HIGH16 = -65536          # 0xFFFF0000 as a signed 32-bit integer
_PHI = 0x61C88647         # 2³²/φ: consecutive indices land far apart before mixing
_MIX1, _MIX2 = 0x7FEB352D, 0x2C1B3C6D   # the finaliser's multipliers (both < 2³¹: int32 scalars)
_INT32_SPAN = 2 ** 31


def _wide(t: torch.Tensor) -> bool:
    """The hash's integer width on this device: int64 with explicit 32-bit masks on CUDA, int32 elsewhere.

    Both give the same 32-bit words (module docstring). On CUDA the update is compiled to Triton, where
    the int32 wrap-around arithmetic came out of inductor's code generation as int64 values and the
    final fp32 bitcast of the rounded word failed to compile ("Cannot
    bitcast data-type of size 64 to data-type of size 32", H200, torch 2.11 / triton 3.6); int64 words
    masked to 32 bits mean the same thing in eager torch, inductor and Triton. On the CPU, int32 keeps
    the eager update's integer work at half the bytes."""
    return t.is_cuda


_MASK32 = 0xFFFFFFFF


def index_base(like: torch.Tensor, offset: int = 0, wide: bool | None = None) -> torch.Tensor:
    """(i·φ) mod 2³² as a 32-bit word, i = ``offset`` + the element's flat index in ``like``.

    Narrow (int32, the CPU): int32 arithmetic wraps modulo 2³², so the low 32 bits are exact at half
    the bytes of int64 (the eager CPU update is bound by this integer work); an index past 2³¹ − 1
    takes int64 and folds back to the signed int32 of the same bits. Wide (int64, CUDA: ``_wide``):
    the same word as a non-negative int64 in [0, 2³²)."""
    n = like.numel()
    wide = _wide(like) if wide is None else wide
    if wide:
        i = torch.arange(offset, offset + n, device=like.device, dtype=torch.int64)
        return ((i * _PHI) & _MASK32).view(like.shape)
    if offset + n <= _INT32_SPAN:
        i = torch.arange(offset, offset + n, device=like.device, dtype=torch.int32)
        return (i * _PHI).view(like.shape)
    i = torch.arange(offset, offset + n, device=like.device, dtype=torch.int64)
    x = (i * _PHI) & _MASK32
    return (x - ((x >> 31) << 32)).to(torch.int32).view(like.shape)     # the same 32 bits, signed


def hash32(base: torch.Tensor, key: torch.Tensor | int, salt: int = 0) -> torch.Tensor:
    """murmur3's 32-bit finaliser of (base + key + salt) mod 2³², on the words of ``index_base``:
    int32 (wrapping multiplies; a logical right shift is the arithmetic one with the sign-extended
    bits masked off) or int64 in [0, 2³²) (every multiply and sum masked to 32 bits; shifts of
    non-negative words are logical). A bijection of its input: distinct (key, element) pairs give
    distinct, well-mixed words; both widths give the same words (the low 16 bits, and the high 16
    after ``(h >> 16) & 0xFFFF``, are equal)."""
    if base.dtype == torch.int64:
        k = key if isinstance(key, torch.Tensor) else int(key)
        x = (base + k + salt) & _MASK32
        x = x ^ (x >> 16)
        x = (x * _MIX1) & _MASK32
        x = x ^ (x >> 15)
        x = (x * _MIX2) & _MASK32
        return x ^ (x >> 16)
    k = key.to(torch.int32) if isinstance(key, torch.Tensor) else key    # keys are < 2³¹ (BF16AdamW._key)
    x = base + k
    if salt:
        x = x + salt
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MIX1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MIX2
    return x ^ ((x >> 16) & 0xFFFF)


def random_bits16(like: torch.Tensor, key: torch.Tensor | int, offset: int = 0) -> torch.Tensor:
    """16 pseudo-random bits per element of ``like`` (int32 in [0, 65536)): the low half of
    ``hash32(index_base(like, offset), key)``. Stateless, so a resumed run draws the same bits, and
    plain tensor arithmetic, so torch.compile fuses it into the update."""
    return hash32(index_base(like, offset), key) & _LOW16


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, key: torch.Tensor | int,
                     offset: int = 0, bits: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded to ``dtype`` (bf16) up or down at random, unbiased: E[result] = x.

    Adds 16 random bits r (uniform on [0, 2¹⁶)) to the fp32 bit pattern and clears the low 16: with
    d the dropped low bits, the carry into bit 16 (one bf16 ulp, away from zero: the sign is a
    separate bit) happens exactly when r ≥ 2¹⁶ − d, i.e. with probability d/2¹⁶, so
    E[result] = truncate(x) + ulp·d/2¹⁶ = x. ``bits``: r given (else ``random_bits16(x, key,
    offset)``). fp16 (not a truncated fp32) gets round-to-nearest instead."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    if bits is None:
        bits = random_bits16(x, key, offset)
    # bits.to(int32): the wide hash's words are int64 (a real conversion, so the sum is int32 in Triton too)
    rounded = (x.contiguous().view(torch.int32) + bits.to(torch.int32)) & _HIGH16
    return _keep_nan(x, rounded.view(torch.float32)).to(torch.bfloat16)    # exact: the low 16 bits are zero


def round_nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) rounded to the nearest ``dtype`` (bf16) value, ties to even: ``x.to(dtype)`` of
    eager torch, written so that no compiler can drop it.

    On the fp32 bit pattern u: add 0x7FFF + (bit 16 of u) and clear the low 16 bits. The dropped part
    d = u & 0xFFFF carries one bf16 ulp (away from zero) exactly when d > 0x8000, or d = 0x8000 and
    bit 16 is set (the tie goes to the even neighbour); a finite value past bf16's largest rounds to
    inf, as in torch. Why not ``x.to(torch.bfloat16)``: inside a compiled kernel inductor's Triton
    code keeps bf16 intermediates in fp32 and, when the cast result is used again as fp32 (Kahan's
    c = y − bf16(y)), emits no rounding at all: c came out 0 everywhere and the compiled Kahan update
    left eager's by up to 48× a bf16 ulp on an H200 (torch 2.11 / triton 3.6; reproduced on the CPU
    with inductor's Triton backend under ``TRITON_INTERPRET=1``). Integer arithmetic has no such
    shortcut. fp16 (not a truncated fp32) keeps ``x.to(dtype)``; the compiled update asks inductor
    for eager's casts (``COMPILE_OPTIONS``) so that one stays too."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    u = x.contiguous().view(torch.int32)
    rounded = (u + (((u >> 16) & 1) + 0x7FFF)) & _HIGH16
    return _keep_nan(x, rounded.view(torch.float32)).to(torch.bfloat16)     # exact: the low 16 bits are zero


def _keep_nan(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` (x's bits after a carry into bit 16), with x's NaNs kept as NaN: a NaN's low bits
    can carry through the exponent into the sign (CUDA's NaN is 0x7FFFFFFF: + 1 gives 0x80000000,
    -0.0), and a diverged weight must stay visibly NaN, not turn into a zero. (x != x rather than
    isnan: the same test, and plain comparison in every backend, Triton's interpreter included.)"""
    return torch.where(x != x, x, rounded)


def adamw_update(p, grad, m_store, v_store, master, comp, scalars, key, beta1: float, beta2: float,
                 eps: float, weight_decay: float, offset: int = 0) -> None:
    """One AdamW update of one tensor, in place (the math in the module docstring).

    ``scalars`` = [lr, lr / (1 − β1^t), 1 − β2^t] (fp32, on the device: no recompile per step);
    ``key`` (int64 0-d, < 2³¹) seeds the rounding: with h_s = hash32(i·φ, key, salt s) per element
    i, m takes the low 16 bits of h_0, v the high 16 bits of h_0, w the low 16 bits of h_1 and the
    Kahan compensation c the high 16 bits of h_1 (two hashes per element for up to three roundings);
    ``offset``: the tensors are the flat elements [offset, offset + n) of larger ones (a chunk): the
    random bits follow the element's index in the whole tensor, so chunks give the whole's result."""
    lr, step_size, bc2 = scalars[0], scalars[1], scalars[2]
    g = grad.float()
    m = m_store.float() * beta1 + g * (1 - beta1)
    v = v_store.float() * beta2 + g * g * (1 - beta2)
    denom = (v / bc2).sqrt() + eps
    if master is not None:
        w = master
    elif comp is not None:
        w = p.float() + comp.float()
    else:
        w = p.float()
    if weight_decay:
        w = w * (1 - lr * weight_decay)
    w = w - step_size * m / denom
    round_mv = m_store.dtype == torch.bfloat16 or v_store.dtype == torch.bfloat16
    round_w = master is None and p.dtype == torch.bfloat16
    base = index_base(p, offset) if round_mv or round_w else None
    if round_mv:
        h0 = hash32(base, key, 0)
        m_store.copy_(m if m_store.dtype == torch.float32 else
                      stochastic_round(m, m_store.dtype, key, bits=h0 & _LOW16))
        v_store.copy_(v if v_store.dtype == torch.float32 else
                      stochastic_round(v, v_store.dtype, key, bits=(h0 >> 16) & _LOW16))
    else:
        m_store.copy_(m)
        v_store.copy_(v)
    h1 = hash32(base, key, 1) if round_w else None
    if master is not None:
        master.copy_(w)
        p.copy_(w)                                          # round to nearest from the fp32 master
    elif p.dtype == torch.float32:
        p.copy_(w)
    elif comp is not None:
        rounded = round_nearest(w, p.dtype)      # a rounding no compiler drops (round_nearest): c needs it
        p.copy_(rounded)
        comp.copy_(w - rounded.float() if h1 is None else
                   stochastic_round(w - rounded.float(), comp.dtype, key, bits=(h1 >> 16) & _LOW16))
    else:
        p.copy_(stochastic_round(w, p.dtype, key, bits=None if h1 is None else h1 & _LOW16))


def adamw_update_chunked(p, grad, m_store, v_store, master, comp, scalars, key, beta1: float,
                         beta2: float, eps: float, weight_decay: float, chunk: int, offset: int = 0) -> None:
    """``adamw_update`` over flat blocks of ``chunk`` elements: the same numbers, bit for bit (the
    update is elementwise and the random bits are keyed by the element's index in the whole tensor).

    Why (eager, on CPU): the update of one tensor allocates ~30 fp32/int64 temporaries of its size; for
    a 150k-vocab embedding that is hundreds of MB each, fresh pages every time. Blocks of 64k elements
    reuse a few cached MB instead (measured on this project's CPU, one thread: 10 M bf16 parameters
    10.4 s whole, 2.1 s in 64k blocks; 16k blocks were faster again at 4 M).

    ``offset``: the tensors are the flat elements [offset, offset + n) of a larger one (an FSDP shard)."""
    tensors = (p, grad, m_store, v_store, master, comp)
    n = p.numel()
    if n <= chunk or not all(t is None or t.is_contiguous() for t in tensors):
        adamw_update(p, grad, m_store, v_store, master, comp, scalars, key, beta1, beta2, eps, weight_decay,
                     offset=offset)
        return
    flat = [None if t is None else t.view(-1) for t in tensors]
    for start in range(0, n, chunk):
        part = [None if t is None else t[start:start + chunk] for t in flat]
        adamw_update(*part, scalars, key, beta1, beta2, eps, weight_decay, offset=offset + start)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (an FSDP2 DTensor's local shard: the same storage), else ``t``."""
    return t._local_tensor if _is_dtensor(t) else t


def shard_offset(p: torch.Tensor) -> int:
    """Flat index, in the whole tensor, of the first element of this process's shard of ``p``
    (0 for a plain tensor). FSDP2 shards rows (``Shard(0)``), so the local shard is one contiguous
    run of the whole tensor's elements: offset = first row × elements per row."""
    if not _is_dtensor(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(offset[1:]) or tuple(local_shape[1:]) != tuple(p.shape[1:]):
        raise NotImplementedError(f"BF16AdamW steps row shards (FSDP2's Shard(0)); this parameter is placed "
                                  f"{p.placements} on a {tuple(p.shape)} tensor")
    return int(offset[0]) * math.prod(p.shape[1:]) if p.dim() else 0


def _placed_like(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``local`` (a state of ``p``'s local shard, same shape) as a DTensor placed like ``p``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def _without_duck_sizing(compiled):
    """``compiled`` traced without duck sizing. By default dynamo gives sizes that are equal when it
    traces the same symbol and guards on the equality (a 1,536 × 1,536 q_proj: rows == cols), so the
    next group whose sizes differ there compiled again: on the H200 a Qwen2-VL-2B full fine-tuning
    step compiled the group update 12 times, 170 s of a 187 s cold start. Without duck sizing every
    size is its own symbol, and one graph serves every group of a kind."""
    from torch.fx.experimental import _config as fx_config

    def call(*args, **kwargs):
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args, **kwargs)

    return call


def adamw_update_group(ps, grads, ms, vs, masters, comps, scalars, keys, beta1: float, beta2: float,
                       eps: float, weight_decay: float, offsets) -> None:
    """``adamw_update`` of each tensor of the lists (flat views): compiled, one call (one graph,
    one kernel per tensor) for a group instead of one compiled call per tensor, whose guard checks
    and Python glue (~tens of µs each) would otherwise run ~340 times a step at 2B."""
    for i in range(len(ps)):
        adamw_update(ps[i], grads[i], ms[i], vs[i], masters[i], comps[i], scalars[i], keys[i], beta1, beta2,
                     eps, weight_decay, offset=offsets[i])


EAGER_CHUNK = 16384    # elements per block of the eager (CPU) update
# inductor options of the compiled update: eager's numerics. emulate_precision_casts keeps every
# fp32 → bf16/fp16 cast that eager performs (inductor's Triton code otherwise computes through them in
# fp32) and turns off Triton's FMA contraction, so a compiled step rounds what the eager one rounds
COMPILE_OPTIONS = {"emulate_precision_casts": True}
# tensors per compiled group call. Every group of a kind has exactly GROUP tensors (the few left over
# take the single-tensor call), so a kind compiles two graphs: the group's (GROUP unrolled updates)
# and the single one. A group graph's compile time grows with GROUP (~1 s per update on an H200),
# its per-step saving with it (one guard check and call per group instead of per tensor)
GROUP = 8
EIGHT_BIT = "8bit"
BLOCK = 256            # elements per absmax block of the 8-bit moments (bitsandbytes' optimizer size)
MIN_8BIT_SIZE = 4096   # smaller tensors keep 16-bit moments (bitsandbytes' min_8bit_size)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW updating 16-bit weights in place (see the module docstring for the math).

    Args:
        rounding: ``"stochastic"`` or ``"kahan"`` for the 16-bit weights.
        state_dtype: dtype of m and v for 16-bit weights (default: the weight's own dtype), or
            ``"8bit"``: m and v stored as bitsandbytes' blockwise dynamic 8-bit codes (signed map for
            m, unsigned for v, one fp32 absmax per 256 elements: 1.03 bytes per moment), decoded to
            fp32 for the update and encoded again after it (round to nearest, as bitsandbytes' 8-bit
            optimizers do; bitsandbytes 0.50's CPU encoder is not exactly that, measured on random
            moments: 0.1 % of signed codes one step from the nearest, 3 % of unsigned codes, up to 7
            steps among the smallest values; after 4 steps 99.98 % of the weights were the same bits
            as with nearest codes, the rest one bf16 rounding apart). The weight keeps this optimizer's stochastic or Kahan update:
            bitsandbytes' own AdamW8bit writes bf16 weights by round-to-nearest, where small updates
            stall (measured: lr 1e-5 on |w| ~ 0.02, 85 % of weights unchanged after 20 steps).
            Tensors under 4,096 elements keep 16-bit moments (as bitsandbytes).
        fp32_master: ``"small"`` (tensors with < 2 dims) or ``"all"``: those keep an fp32 master
            copy and fp32 moments.
        seed: seeds the stochastic rounding (with the step and the tensor's index).
        compile: run each tensor's update as one torch.compile'd kernel (default: on CUDA), launched
            in groups of ``GROUP`` tensors of one kind per compiled call, the left-over tensors of a
            kind one per call (flat views, dynamic sizes, no duck sizing: two graphs per kind,
            reused every step and by every shape). Eager, the ~40 elementwise ops
            per tensor each launch a kernel and write a temporary; on CPU the eager update runs
            over blocks of ``EAGER_CHUNK`` elements (``adamw_update_chunked``).

    One ``step`` never waits for the device: every tensor's step number is a host (CPU) tensor, and
    the per-tensor scalars (lr, bias corrections) and rounding keys of the whole step go to the device
    in one non-blocking copy, so the host queues the updates while the GPU still runs backward. (The
    first version built two small device tensors per weight, each a blocking host-to-device copy: a
    device sync per weight, ~340 a step at 2B, so the GPU idled between update kernels.)
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rounding: str = "stochastic",
                 state_dtype: torch.dtype | str | None = None, fp32_master: str = "small", seed: int = 0,
                 compile: bool | None = None):
        if rounding not in ("stochastic", "kahan"):
            raise ValueError(f"rounding: {rounding!r} is not 'stochastic' or 'kahan'")
        if fp32_master not in ("small", "all"):
            raise ValueError(f"fp32_master: {fp32_master!r} is not 'small' or 'all'")
        if isinstance(state_dtype, str) and state_dtype != EIGHT_BIT:
            raise ValueError(f"state_dtype: {state_dtype!r} is not a torch dtype or {EIGHT_BIT!r}")
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid lr/eps/betas: {lr}, {eps}, {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.rounding = rounding
        self.state_dtype = state_dtype
        self.fp32_master = fp32_master
        self.seed = int(seed)
        self.compile = compile
        self._update = None
        self._update_group = None
        self._codes: dict = {}

    def _compiled(self, device: torch.device) -> bool:
        return self.compile if self.compile is not None else device.type == "cuda"

    def _update_fn(self, device: torch.device):
        if self._update is None:
            if self._compiled(device):   # one fused kernel per tensor: its temporaries live in registers
                self._update = _without_duck_sizing(torch.compile(adamw_update, dynamic=True,
                                                                  options=COMPILE_OPTIONS))
            else:
                self._update = partial(adamw_update_chunked, chunk=EAGER_CHUNK)
        return self._update

    def _group_fn(self):
        if self._update_group is None:
            self._update_group = _without_duck_sizing(torch.compile(adamw_update_group, dynamic=True,
                                                                    options=COMPILE_OPTIONS))
        return self._update_group

    def _key(self, step: int, index: int) -> int:
        # a fixed function of (seed, step, tensor): a resumed run draws the same bits
        return (self.seed * 1_000_003 + step * 7_919 + index * 4) % (2 ** 31)

    def _keeps_master(self, p: torch.Tensor) -> bool:
        return self.fp32_master == "all" or p.dim() < 2

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        """Fresh state for ``p``; under FSDP2 for its local shard (shapes of ``p._local_tensor``; the
        choice of 8-bit moments by the whole tensor's size, so every process makes the same one)."""
        local = _local(p)
        state["step"] = torch.zeros((), dtype=torch.float32)     # on the host: read without a sync
        low = p.dtype in (torch.bfloat16, torch.float16)
        if low and self._keeps_master(p):
            state["master"] = local.detach().float().clone()
            moments = torch.float32
        elif low:
            moments = self.state_dtype or p.dtype
            if self.rounding == "kahan":
                state["compensation"] = torch.zeros_like(local, memory_format=torch.preserve_format)
        else:
            moments = p.dtype
        if moments == EIGHT_BIT and p.numel() < MIN_8BIT_SIZE:
            moments = p.dtype
        if moments == EIGHT_BIT:
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                # every element the code of 0.0 in its map: zero moments decode to exactly 0
                zero = int(self._code(signed, local.device).abs().argmin())
                state[name] = torch.full(local.shape, zero, dtype=torch.uint8, device=local.device)
                state[name + "_absmax"] = torch.zeros(-(-local.numel() // BLOCK), dtype=torch.float32,
                                                      device=local.device)
            return
        state["exp_avg"] = torch.zeros_like(local, dtype=moments, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(local, dtype=moments, memory_format=torch.preserve_format)

    def _code(self, signed: bool, device: torch.device) -> torch.Tensor:
        """bitsandbytes' dynamic quantization map (256 values in [-1, 1], or [0, 1] unsigned)."""
        key = (signed, str(device))
        if key not in self._codes:
            from bitsandbytes.functional import create_dynamic_map

            self._codes[key] = create_dynamic_map(signed=signed).to(device)
        return self._codes[key]

    def _decode(self, state: dict, name: str, signed: bool) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_blockwise

        q = state[name]
        if q.numel() == 0:        # an empty shard (a small tensor's rows all on other processes)
            return torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        return dequantize_blockwise(q, absmax=state[name + "_absmax"], code=self._code(signed, q.device),
                                    blocksize=BLOCK).float().view(q.shape)

    def _encode(self, state: dict, name: str, x: torch.Tensor, signed: bool) -> None:
        from bitsandbytes.functional import quantize_blockwise

        if x.numel() == 0:
            return
        q, qstate = quantize_blockwise(x.contiguous(), code=self._code(signed, x.device), blocksize=BLOCK)
        state[name].copy_(q.view(state[name].shape))
        state[name + "_absmax"].copy_(qstate.absmax)

    def _step_numbers(self, todo: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every tensor's [lr, lr / (1 − β1^t), 1 − β2^t] (fp32) and rounding key (int64), built on
        the host and copied to ``device`` at once (non-blocking from pinned memory on CUDA)."""
        rows, keys = [], []
        for p, state, index, group in todo:
            t = int(state["step"])                   # a host tensor: no device sync
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            # rows padded to 16 bytes: each tensor's row starts aligned, as compiled kernels want
            # their inputs (a misaligned view would be copied first)
            rows.append((lr, lr / (1 - beta1 ** t), 1 - beta2 ** t, 0.0))
            keys.append((self._key(t, index), 0))
        scalars = torch.tensor(rows, dtype=torch.float32)
        keys_t = torch.tensor(keys, dtype=torch.int64)
        if device.type == "cuda":
            return (scalars.pin_memory().to(device, non_blocking=True),
                    keys_t.pin_memory().to(device, non_blocking=True))
        return scalars.to(device), keys_t.to(device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []                                    # (param, state, index, group)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BF16AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                todo.append((p, state, index, group))
        numbers = {}
        grouped: dict[tuple, list[int]] = {}     # compiled path: tensors of one kind, updated together
        for i, (p, state, index, group) in enumerate(todo):
            local = _local(p)                    # FSDP2: this process's rows (module docstring)
            if p.device not in numbers:
                numbers[p.device] = self._step_numbers(todo, p.device)
            if local.numel() == 0:
                continue
            scalars, keys = numbers[p.device]
            beta1, beta2 = group["betas"]
            eight_bit = state["exp_avg"].dtype == torch.uint8
            if not eight_bit and self._compiled(p.device):
                kind = self._kind(p, state, group)
                if kind is not None:
                    grouped.setdefault(kind, []).append(i)
                    continue
            m = self._decode(state, "exp_avg", True) if eight_bit else state["exp_avg"]
            v = self._decode(state, "exp_avg_sq", False) if eight_bit else state["exp_avg_sq"]
            self._update_fn(p.device)(local, _local(p.grad), m, v, state.get("master"),
                                      state.get("compensation"), scalars[i], keys[i, 0], beta1, beta2,
                                      group["eps"], group["weight_decay"], offset=shard_offset(p))
            if eight_bit:
                self._encode(state, "exp_avg", m, True)
                self._encode(state, "exp_avg_sq", v, False)
        for idx in grouped.values():
            whole = len(idx) - len(idx) % GROUP
            for start in range(0, whole, GROUP):
                self._step_group(todo, idx[start:start + GROUP], numbers)
            for i in idx[whole:]:              # the rest one by one: no graph per remainder length
                self._step_single(todo, i, numbers)
        return loss

    @staticmethod
    def _kind(p: torch.Tensor, state: dict, group: dict) -> tuple | None:
        """What must be equal for tensors to share a compiled group call (dtypes, which states exist,
        the group's hyperparameters and device); None when a tensor is not contiguous (it keeps its
        own call: the group passes flat views)."""
        local = _local(p)
        tensors = (local, _local(p.grad), state["exp_avg"], state["exp_avg_sq"], state.get("master"),
                   state.get("compensation"))
        if not all(t is None or t.is_contiguous() for t in tensors):
            return None
        return (local.device, tuple(None if t is None else t.dtype for t in tensors), group["betas"],
                group["eps"], group["weight_decay"])

    def _step_single(self, todo: list, i: int, numbers: dict) -> None:
        """The compiled single-tensor update of ``todo[i]`` on flat views (the graph every left-over
        tensor of every group-able kind shares, whatever its shape)."""
        p, state, _, group = todo[i]
        scalars, keys = numbers[p.device]
        beta1, beta2 = group["betas"]
        master, comp = state.get("master"), state.get("compensation")
        self._update_fn(p.device)(_local(p).view(-1), _local(p.grad).view(-1), state["exp_avg"].view(-1),
                                  state["exp_avg_sq"].view(-1), None if master is None else master.view(-1),
                                  None if comp is None else comp.view(-1), scalars[i], keys[i, 0], beta1, beta2,
                                  group["eps"], group["weight_decay"], offset=shard_offset(p))

    def _step_group(self, todo: list, idx: list[int], numbers: dict) -> None:
        """One compiled call updating the tensors ``todo[i]`` for i in ``idx`` (one kind)."""
        def flat(t):
            return None if t is None else t.view(-1)

        items = [todo[i] for i in idx]
        p0, _, _, group = items[0]
        scalars, keys = numbers[p0.device]
        beta1, beta2 = group["betas"]
        self._group_fn()([flat(_local(p)) for p, _, _, _ in items], [flat(_local(p.grad)) for p, _, _, _ in items],
                         [flat(st["exp_avg"]) for _, st, _, _ in items], [flat(st["exp_avg_sq"]) for _, st, _, _ in items],
                         [flat(st.get("master")) for _, st, _, _ in items],
                         [flat(st.get("compensation")) for _, st, _, _ in items],
                         [scalars[i] for i in idx], [keys[i, 0] for i in idx], beta1, beta2, group["eps"],
                         group["weight_decay"], [shard_offset(p) for p, _, _, _ in items])

    def state_dict(self) -> dict:
        """torch's form; under FSDP2 (any DTensor parameter) every state placed like its parameter, so
        DCP can reshard it: 8-bit moments as their codes plus each element's block absmax (4 bytes per
        element, where 8-bit blocks cut per local shard could not be resharded as they are)."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        if not any(_is_dtensor(p) for p in params):
            return sd
        state = {}
        for i, p in enumerate(params):           # torch numbers the parameters in this order
            st = self.state.get(p)
            if not st:
                continue
            entry = {}
            for k, v in st.items():
                if k.endswith("_absmax"):    # per element, so that it reshards like the codes
                    v = v.repeat_interleave(BLOCK)[:_local(p).numel()].view(_local(p).shape)
                entry[k] = _placed_like(v, p) if isinstance(v, torch.Tensor) and v.dim() and _is_dtensor(p) else v
            state[i] = entry
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Either form of ``state_dict`` (this process's 8-bit codes, or dense states: DTensors placed
        like the parameter, or whole tensors), into states of this process's shard.

        torch's own loader would cast every floating state tensor to its weight's dtype; our fp32
        masters and moments must come back as saved (fp32), or a resumed run would differ from an
        unbroken one. So the groups load through torch (checks, hooks) and each parameter's state is
        built fresh (``_init_state``: the dtypes and shapes this run uses) and filled from the saved
        one; step counts stay on the host (a resume that mapped them to the GPU would sync on every
        read). Dense moments into 8-bit state are encoded into the local shard's blocks (within the
        8-bit resolution); 8-bit codes of the same shape are copied as they are (bit-exact)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved and saved[i]:
                self.state[p] = self._restore(p, saved[i])

    def _restore(self, p: torch.Tensor, entry: dict) -> dict:
        local = _local(p)
        state: dict = {}
        self._init_state(p, state)
        entry = dict(entry)
        for name in ("exp_avg", "exp_avg_sq"):       # saved 8-bit codes
            codes, absmax = entry.get(name), entry.pop(name + "_absmax", None)
            if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8):
                continue
            codes, absmax = _local(codes), _local(absmax)
            blocks = _block_absmax(absmax, codes)
            if state[name].dtype == torch.uint8 and blocks is not None and codes.shape == state[name].shape:
                state[name].copy_(codes)                 # the same blocks: bit-exact
                state[name + "_absmax"].copy_(blocks)
                del entry[name]
            else:                                        # other blocks: decode, re-encode below
                entry[name] = decode_8bit(codes, absmax, signed=name == "exp_avg")
        for k, v in entry.items():
            if k == "step":
                state[k] = (v.detach().to("cpu", torch.float32, copy=True) if isinstance(v, torch.Tensor)
                            else torch.tensor(float(v)))
            elif k not in state or not isinstance(v, torch.Tensor):
                continue                               # a state this run does not keep (other settings)
            else:
                v = _shard_of(v, p, local).to(local.device)
                if state[k].dtype == torch.uint8:
                    self._encode(state, k, v.float().contiguous(), k == "exp_avg")
                else:
                    state[k].copy_(v)
        return state


def _shard_of(v: torch.Tensor, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The part of a saved state ``v`` that belongs to this process's shard of ``p``: a DTensor's
    local tensor, or a whole tensor's rows; shaped like the local shard."""
    if _is_dtensor(v):
        v = v.to_local()
    elif v.numel() == p.numel() != local.numel():
        start = shard_offset(p)
        v = v.reshape(-1)[start:start + local.numel()]
    if v.numel() != local.numel():
        raise ValueError(f"optimizer state of {tuple(v.shape)} for a parameter shard of {tuple(local.shape)}")
    return v.reshape(local.shape)


def _block_absmax(absmax: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
    """Per-block absmax (one per 256 codes) from a saved one: as it is, or from the per-element form
    of an FSDP2 checkpoint when its values are constant over this shard's blocks; None when not
    (the checkpoint's blocks were cut elsewhere)."""
    n = codes.numel()
    if absmax.dim() == 1 and absmax.numel() == -(-n // BLOCK) and absmax.shape != codes.shape:
        return absmax
    flat = absmax.reshape(-1)
    if flat.numel() != n:
        return None
    blocks = flat[::BLOCK]
    return blocks if torch.equal(blocks.repeat_interleave(BLOCK)[:n], flat) else None


def decode_8bit(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """fp32 moments from BF16AdamW's 8-bit codes (bitsandbytes' dynamic map): code[q] · absmax, with
    ``absmax`` one per block of 256 (one process's state) or one per element (an FSDP2 checkpoint)."""
    from bitsandbytes.functional import create_dynamic_map

    code = create_dynamic_map(signed=signed).to(codes.device)
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    absmax = absmax.to(codes.device, torch.float32).reshape(-1)
    if absmax.numel() != codes.numel():
        absmax = absmax.repeat_interleave(BLOCK)[:codes.numel()]
    return (code[codes.reshape(-1).long()] * absmax).view(codes.shape)


def dense_entry(entry: dict) -> dict:
    """A BF16AdamW state entry with 8-bit moments as fp32 moments (others unchanged): the portable
    form ``vlm.train.cross_resume`` places on another strategy's shards."""
    if "exp_avg_absmax" not in entry:
        return entry
    out = {k: v for k, v in entry.items() if not k.endswith("_absmax")}
    for name in ("exp_avg", "exp_avg_sq"):
        out[name] = decode_8bit(entry[name], entry[name + "_absmax"], signed=name == "exp_avg")
    return out


def optimizer_bytes_per_parameter(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state per trained parameter (after at least one step); under FSDP2 per
    element of this process's shards (the states are per shard)."""
    n = sum(_local(p).numel() for g in optimizer.param_groups for p in g["params"] if p in optimizer.state)
    total = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return total / n if n else math.nan
