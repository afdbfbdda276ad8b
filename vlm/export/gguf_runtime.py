"""Run an exported GGUF pair with llama.cpp (``llama_cpp`` + its ``mtmd`` bindings) for checking.

``GgufModel(folder)`` loads ``model-*.gguf`` and ``mmproj-*.gguf``; ``prompt`` tokenizes a prompt
whose image sits at llama.cpp's media marker (mtmd adds the family's image begin/end tokens and
the image's embedding positions), evaluates it, and gives the token sequence llama.cpp built (each
image as ``image_token_id`` repeated once per embedding, i.e. the layout of transformers' input ids)
and the logits of the last position. ``step(token)`` feeds one token and returns the next logits:
greedy decoding and teacher forcing are both loops over it. One thread, greedy, no sampler.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from vlm.export.gguf_toolchain import require_runtime


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected one {pattern}, found {[p.name for p in found]}")
    return found[0]


class GgufModel:
    def __init__(self, folder: str | Path, *, n_ctx: int = 1024, n_threads: int = 1):
        require_runtime("running a GGUF export")
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        folder = Path(folder)
        self.model_path = _one(folder, "model-*.gguf")
        self.mmproj_path = _one(folder, "mmproj-*.gguf")
        self._mtmd = mtmd
        self.llama = llama_cpp.Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                     n_threads=n_threads, n_threads_batch=n_threads, logits_all=True,
                                     verbose=False)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = False
        self.ctx = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self.llama.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not load the projector {self.mmproj_path} with {self.model_path}")
        self.llama._stack.callback(lambda: mtmd.mtmd_free(self.ctx))
        self.marker = mtmd.mtmd_default_marker().decode()
        self.n_vocab = self.llama.n_vocab()

    def close(self) -> None:
        self.llama.close()

    def _bitmap(self, image):
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        return self._mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], buf)

    def prompt(self, text: str, images: list, image_token_id: int) -> tuple[list[int], np.ndarray]:
        """Evaluate ``text`` (one marker per image) from an empty cache → (token layout, last logits)."""
        mtmd = self._mtmd
        import llama_cpp

        self.llama.reset()
        self.llama._ctx.kv_cache_clear()
        bitmaps = [self._bitmap(im) for im in images]
        chunks = mtmd.mtmd_input_chunks_init()
        layout: list[int] = []
        try:
            inp = mtmd.mtmd_input_text()
            inp.text = text.encode()
            inp.add_special = True
            inp.parse_special = True
            arr = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize failed ({rc}): {len(images)} images for the markers in the prompt?")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    tokens = [ptr[j] for j in range(n.value)]
                    layout += tokens
                    self.llama.eval(tokens)
                else:
                    layout += [image_token_id] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    new_past = llama_cpp.llama_pos(0)
                    rc = mtmd.mtmd_helper_eval_chunk_single(
                        self.ctx, self.llama._ctx.ctx, chunk, llama_cpp.llama_pos(self.llama.n_tokens),
                        llama_cpp.llama_seq_id(0), self.llama.n_batch, True, ctypes.byref(new_past))
                    if rc != 0:
                        raise RuntimeError(f"llama.cpp failed to encode/decode image chunk ({rc})")
                    self.llama.n_tokens = new_past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for b in bitmaps:
                mtmd.mtmd_bitmap_free(b)
        return layout, self._last_logits()

    def _last_logits(self) -> np.ndarray:
        return np.array(self.llama.scores[self.llama.n_tokens - 1], dtype=np.float32)

    def step(self, token: int) -> np.ndarray:
        self.llama.eval([int(token)])
        return self._last_logits()

    def greedy(self, text: str, images: list, image_token_id: int, n: int, banned: tuple[int, ...] = ()
               ) -> tuple[list[int], list[int], np.ndarray]:
        """``n`` greedy tokens (``banned`` ids never chosen: transformers' ``min_new_tokens`` bans EOS the
        same way) → (prompt layout, tokens, logits of each step [n, vocab])."""
        layout, logits = self.prompt(text, images, image_token_id)
        out, steps = [], []
        for _ in range(n):
            steps.append(logits)
            masked = logits.copy()
            masked[list(banned)] = -np.inf
            out.append(int(masked.argmax()))
            logits = self.step(out[-1])
        return layout, out, np.stack(steps)

    def teacher_forced(self, text: str, images: list, image_token_id: int, continuation: list[int]) -> np.ndarray:
        """Logits predicting each token of ``continuation`` given the prompt and the tokens before it."""
        _layout, logits = self.prompt(text, images, image_token_id)
        rows = [logits]
        for tok in continuation[:-1]:
            rows.append(self.step(tok))
        return np.stack(rows)
