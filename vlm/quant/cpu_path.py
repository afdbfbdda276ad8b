"""Which CPU path bitsandbytes' 4-bit layers take: the portable one, on every machine.

bitsandbytes (0.50.2) ``Linear4bit.forward`` has two CPU paths:

- portable (every CPU; training; eval with grad): ``W = dequantize_4bit(codes, absmax)`` in the
  compute dtype (absmax in float32, double-quantized absmax expanded first), then
  ``y = x · Wᵀ + b`` with torch's matmul;
- packed (only when the CPU has AVX512-BF16, the module is in eval mode and the input needs no
  grad): the first such call rewrites the weight *in place* for a fused kernel
  (``functional._convert_weight_packed_for_cpu``): the 4-bit codes of each tile of 32 output rows
  are interleaved, absmax is expanded and rounded to bf16, and from then on
  ``y = bf16(x) · Wᵀ`` runs in that kernel.

The packed path is wrong for this project twice over:

1. its repack assumes ``out_features % 32 == 0`` and ``in_features % blocksize == 0`` and raises
   ``RuntimeError: shape '[96, 0]' is invalid ...`` otherwise (tiny models, vision towers,
   projectors and odd hidden sizes have such shapes);
2. where it holds, its numbers differ from the portable path's (bf16 absmax, bf16 input), so the
   same command would print different captions and scores on a CPU with AVX512-BF16 and on one
   without, and eval-mode logits would differ from what training computed.

So every 4-bit layer the project loads takes the portable path on CPU: bitsandbytes reads the
decision from the layer's own ``support_avx512bf16_for_cpu`` attribute (set from the CPU at
construction), and :func:`use_portable_cpu_path` sets it to False per layer, right after loading.
The attribute is read only for CPU inputs, so the GPU path is untouched.

A layer bitsandbytes already repacked cannot be given back its saved statistics: the repack
rounded absmax to bf16 (and bitsandbytes' inverse re-quantizes the double-quantized absmax from
those rounded values, or leaves a plain absmax transposed), so saving such a layer writes other
numbers than were loaded. :func:`use_portable_cpu_path` refuses it with an error rather than
carry on with changed weights.
"""

from __future__ import annotations

from pathlib import Path

PACK_BLOCK_N = 32   # bitsandbytes' packed layout: output rows per tile (block_n)


def packed_layout_fits(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' packed CPU layout can hold a [out_features, in_features] weight
    quantized with ``blocksize``: whole tiles of 32 rows and whole absmax blocks per row."""
    return out_features % PACK_BLOCK_N == 0 and in_features % blocksize == 0 and in_features % 2 == 0


def cpu_has_avx512_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the kernel reports the avx512_bf16 flag (the condition of bitsandbytes' packed path)."""
    try:
        return "avx512_bf16" in Path(cpuinfo).read_text()
    except OSError:
        return False


def _four_bit_layers(model):
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            yield name, module


def use_portable_cpu_path(model) -> int:
    """Make every bitsandbytes ``Linear4bit`` of ``model`` (a PEFT wrapper too) take the portable
    CPU path, whatever the CPU (see the module docstring). Returns the number of 4-bit layers.
    Idempotent; a no-op for models without 4-bit layers. Raises VlmError naming the layers that
    bitsandbytes already repacked (call this before the first eval-mode forward)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:      # no bitsandbytes: no 4-bit layers either
        return 0
    from vlm.errors import VlmError

    layers = list(_four_bit_layers(model))
    repacked = [name for name, layer in layers
                if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)]
    if repacked:
        raise VlmError(f"{len(repacked)} 4-bit layer(s) were already repacked by bitsandbytes' AVX512-BF16 "
                       f"CPU path ({', '.join(repacked[:3])}{', ...' if len(repacked) > 3 else ''}); their "
                       "statistics were rounded to bf16 and cannot be restored exactly: reload the model "
                       "and choose the CPU path before its first eval-mode forward")
    count = 0
    for _, layer in layers:
        layer.support_avx512bf16_for_cpu = False
        count += 1
    return count


__all__ = ["PACK_BLOCK_N", "cpu_has_avx512_bf16", "packed_layout_fits", "use_portable_cpu_path"]
