"""Triton kernels for the language side (installed as ``vlm.kernels``; never import a bare ``kernels``)."""
