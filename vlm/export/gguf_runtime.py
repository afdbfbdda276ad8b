"""Run an exported GGUF pair with llama.cpp (``llama_cpp`` + its ``mtmd`` bindings) for checking.

``GgufModel(folder)`` loads ``model-*.gguf`` and ``mmproj-*.gguf``; ``prompt`` tokenizes a prompt
whose image sits at llama.cpp's media marker (mtmd adds the family's image begin/end tokens and
the image's embedding positions), evaluates it, and gives the token sequence llama.cpp built (each
image as ``image_token_id`` repeated once per embedding, with the family's row-break token where its
projector puts one — i.e. the layout of transformers' input ids) and the logits of the last
position; ``image_embeddings`` gives the projector's output for one image. ``step(token)`` feeds one token and returns the next logits:
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


def image_layout(n_tokens: int, image_size: tuple[int, int], image_token_id: int,
                 break_token_id: int | None) -> list[int]:
    """The token ids of one image chunk of ``n_tokens`` embeddings, as transformers lays them out.

    Without a break token: ``n_tokens`` image tokens. With one (Pixtral): ``rows`` rows of ``cols``
    patches with a break between rows, so ``n_tokens = rows·(cols + 1) − 1``; mtmd reports only the
    total, so the grid is the factorisation of ``n_tokens + 1`` whose cols/rows is nearest the
    image's width/height (the preprocessing keeps the aspect ratio up to one patch of rounding)."""
    if break_token_id is None:
        return [image_token_id] * n_tokens
    width, height = image_size
    grids = [(r, (n_tokens + 1) // r - 1) for r in range(1, n_tokens + 2) if (n_tokens + 1) % r == 0]
    rows, cols = min((g for g in grids if g[1] > 0), key=lambda g: abs(np.log(g[1] / g[0]) - np.log(width / height)))
    row = [image_token_id] * cols
    return (row + [break_token_id]) * (rows - 1) + row


class GgufModel:
    def __init__(self, folder: str | Path, *, n_ctx: int = 1024, n_threads: int = 1):
        require_runtime("running a GGUF export")
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        folder = Path(folder)
        self.model_path = _one(folder, "model-*.gguf")
        self.mmproj_path = _one(folder, "mmproj-*.gguf")
        self._mtmd = mtmd
        # Weights in the plain CPU buffer (llama.cpp's `--no-extra-bufts`): the extra buffer types
        # repack for AMX / other kernels, and on a CPU that advertises AMX where the kernel does not
        # grant tile use (seen here: Sapphire Rapids in a container) a q8_0 matmul dies with SIGILL.
        # llama_cpp.Llama has no argument for it, so its default-params function is swapped while
        # the model loads.
        default_params = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_bufts
        try:
            self.llama = llama_cpp.Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_batch=n_ctx,
                                         n_ubatch=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                         logits_all=True, verbose=False)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = default_params
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

    def prompt(self, text: str, images: list, image_token_id: int, break_token_id: int | None = None
               ) -> tuple[list[int], np.ndarray]:
        """Evaluate ``text`` (one marker per image) from an empty cache → (token layout, last logits).

        ``break_token_id``: the family ends each row of image patches but the last with this token
        (Pixtral's ``[IMG_BREAK]``), whose embedding mtmd puts inside the image chunk; the layout
        then shows it where transformers' processor writes it."""
        mtmd = self._mtmd
        import llama_cpp

        self.llama.reset()
        self.llama._ctx.kv_cache_clear()
        bitmaps = [self._bitmap(im) for im in images]
        chunks = mtmd.mtmd_input_chunks_init()
        layout: list[int] = []
        n_seen = 0   # images laid out so far
        try:
            inp = mtmd.mtmd_input_text()
            encoded = text.encode()   # kept alive: the struct holds only a pointer to it
            inp.text = encoded
            inp.text_len = len(encoded)
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
                    n_image = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    layout += image_layout(n_image, images[n_seen].size, image_token_id, break_token_id)
                    n_seen += 1
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

    def image_embeddings(self, image) -> np.ndarray:
        """The projector's output for one image, as mtmd hands it to the language model
        ([image tokens, hidden]): the vision side checked on its own, without the decoder."""
        mtmd = self._mtmd
        bitmap = self._bitmap(image)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            inp = mtmd.mtmd_input_text()
            encoded = self.marker.encode()
            inp.text = encoded
            inp.text_len = len(encoded)
            inp.add_special = False
            inp.parse_special = True
            arr = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed on a lone image marker")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    continue
                if mtmd.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise RuntimeError("llama.cpp failed to encode the image")
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                hidden = self.llama.n_embd()
                ptr = mtmd.mtmd_get_output_embd(self.ctx)
                return np.ctypeslib.as_array(ptr, shape=(n * hidden,)).reshape(n, hidden).copy()
            raise RuntimeError("mtmd made no image chunk for the marker")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _last_logits(self) -> np.ndarray:
        return np.array(self.llama.scores[self.llama.n_tokens - 1], dtype=np.float32)

    def step(self, token: int) -> np.ndarray:
        self.llama.eval([int(token)])
        return self._last_logits()

    def greedy(self, text: str, images: list, image_token_id: int, n: int, banned: tuple[int, ...] = (),
               break_token_id: int | None = None) -> tuple[list[int], list[int], np.ndarray]:
        """``n`` greedy tokens (``banned`` ids never chosen: transformers' ``min_new_tokens`` bans EOS the
        same way) → (prompt layout, tokens, logits of each step [n, vocab])."""
        layout, logits = self.prompt(text, images, image_token_id, break_token_id)
        out, steps = [], []
        for _ in range(n):
            steps.append(logits)
            masked = logits.copy()
            masked[list(banned)] = -np.inf
            out.append(int(masked.argmax()))
            logits = self.step(out[-1])
        return layout, out, np.stack(steps)

    def teacher_forced(self, text: str, images: list, image_token_id: int, continuation: list[int],
                       break_token_id: int | None = None) -> np.ndarray:
        """Logits predicting each token of ``continuation`` given the prompt and the tokens before it."""
        _layout, logits = self.prompt(text, images, image_token_id, break_token_id)
        rows = [logits]
        for tok in continuation[:-1]:
            rows.append(self.step(tok))
        return np.stack(rows)
