"""Triton kernels for the language side (installed as ``vlm.kernels``; never import a bare ``kernels``).

One op per file, each with its Triton kernel(s), autograd Function, pure-torch reference and wrapper:
``rms_norm`` (also Gemma's (1 + w)), ``rope`` (RoPE and M-RoPE), ``swiglu``, ``geglu``,
``fused_linear_cross_entropy`` (with logit soft-capping), ``nf4``
(bitsandbytes NF4 dequantization) and ``nf4_lora`` (fused NF4 base + LoRA linear). ``patch(model)``
routes a supported VLM's language side through them; ``unpatch(model)`` undoes it.
"""

from vlm.kernels.patch import PatchReport, is_patched, patch, unpatch

__all__ = ["PatchReport", "is_patched", "patch", "unpatch"]
