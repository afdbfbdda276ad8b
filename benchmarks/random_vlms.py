"""Random-weight checkpoints of the new families at their real sizes, with the zoo's tiny tokenizer.

    from random_vlms import build; build(Path("/tmp/x"), "gemma3_4b")   # -> /tmp/x/gemma3_4b_random

Sizes: ``qwen3_vl_8b`` (Qwen3-VL-8B-Instruct), ``gemma3_4b`` / ``gemma3_12b`` (gemma-3-*-it),
``mistral_small_3_1_24b`` (Mistral-Small-3.1-24B-Instruct-2503): the config.json values of those
checkpoints (text and vision towers), written over the zoo builder's config, so the special-token
ids are the tiny tokenizer's (a subset of the real vocabulary) and image tokens and chat templates
work as with the real checkpoint. The processor is the zoo's with the real image geometry (Gemma 3:
896 px, 256 soft tokens per image). Weights: bf16, seed 0, built on the GPU when there is one.
``--tiny`` builds the same configs shrunk (CPU smoke test).

Memory and disk (the 24B is 48 GB in bf16; a device has 128 GiB of RAM and 64 GiB of disk): the
weights are initialised in bf16 where they live (the GPU), never as an fp32 model in host memory;
they are written in shards of at most ``SHARD_SIZE`` (safetensors copies a whole shard to host
memory before writing it, so transformers' default 50 GB shard would put all 48 GB in RAM at once);
the folder appears only when complete (``vlm.atomic.replacing_folder``), and the partial folder a
killed build left behind is removed first (it would otherwise hold up to 48 GB of the disk).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

SHARD_SIZE = "4GB"   # host memory a checkpoint write needs: one shard at a time

SIZES = {
    "qwen3_vl_8b": dict(
        zoo="qwen3_vl",
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                   "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])),
    "gemma3_4b": dict(
        zoo="gemma3",
        text=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                  sliding_window=1024, layer_types=None, sliding_window_pattern=6),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14),
        top=dict(mm_tokens_per_image=256)),
    "gemma3_12b": dict(
        zoo="gemma3",
        text=dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                  sliding_window=1024, layer_types=None, sliding_window_pattern=6),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14),
        top=dict(mm_tokens_per_image=256)),
    "mistral_small_3_1_24b": dict(
        zoo="mistral3",
        text=dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    head_dim=64, image_size=1540, patch_size=14)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)   # --tiny: text shrunk to this


def config_for(name: str, tiny: bool = False):
    """The transformers config of ``name`` (real sizes, or the text shrunk with ``tiny``)."""
    import importlib

    spec = SIZES[name]
    zoo = importlib.import_module(f"vlm.zoo.{spec['zoo']}")
    kw = zoo.config_kwargs()
    text = dict(kw["text_config"], **spec["text"])
    vision = dict(kw["vision_config"], **({} if tiny else spec["vision"]))
    if tiny:
        text.update(TINY, vocab_size=kw["text_config"]["vocab_size"])
        text.pop("head_dim", None)
        text.pop("query_pre_attn_scalar", None)
        if spec["zoo"] == "qwen3_vl":
            text["rope_parameters"] = kw["text_config"]["rope_parameters"]
    if text.get("layer_types", 0) is None:   # Gemma 3: 5 sliding-window layers per full one
        n, p = text["num_hidden_layers"], text.pop("sliding_window_pattern")
        text["layer_types"] = ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(n)]
    cfg_cls = {"qwen3_vl": "Qwen3VLConfig", "gemma3": "Gemma3Config", "mistral3": "Mistral3Config"}[spec["zoo"]]
    import transformers

    top = dict(kw, text_config=text, vision_config=vision, **({} if tiny else spec.get("top", {})))
    return getattr(transformers, cfg_cls)(**top)


def _processor(name: str, tiny_dir: Path, tiny: bool):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_dir)
    if SIZES[name]["zoo"] == "gemma3" and not tiny:   # fixed geometry: 896 px -> 256 soft tokens
        from vlm.zoo.gemma3 import CHAT_TEMPLATE
        from transformers import Gemma3Processor

        proc.image_processor.size = {"height": 896, "width": 896}
        proc = Gemma3Processor(image_processor=proc.image_processor, tokenizer=proc.tokenizer,
                               chat_template=CHAT_TEMPLATE, image_seq_length=256)
    if SIZES[name]["zoo"] == "mistral3" and not tiny:
        proc.image_processor.size = {"longest_edge": 1540}
    return proc


def remove_partial_builds(path: Path) -> list[Path]:
    """Delete what a killed build of ``path`` left: replacing_folder's temporary ``.<name>.*`` folders."""
    stale = sorted(p for p in path.parent.glob(f".{path.name}.*") if p.is_dir())
    for p in stale:
        print(f"removing {p}: a partial random checkpoint (a build that did not finish)", flush=True)
        shutil.rmtree(p)
    return stale


def check_disk(path: Path, n_params: int) -> None:
    """Refuse to start a build the disk cannot hold (bf16: 2 bytes a parameter, + 5 % for the
    rest), naming the other random checkpoints there that could be deleted."""
    need = int(n_params * 2 * 1.05)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        others = sorted(p.name for p in path.parent.glob("*_random*") if p.is_dir() and p != path)
        raise SystemExit(f"{path}: {need / 1e9:.1f} GB needed for {n_params / 1e9:.2f} B bf16 parameters, "
                         f"{free / 1e9:.1f} GB free on {path.parent}"
                         + (f"; other random checkpoints there: {', '.join(others)}" if others else ""))


def save_checkpoint(model, processor, path: Path) -> None:
    """Write ``model`` (shard by shard) and ``processor`` to ``path``, which appears only when complete."""
    from vlm.atomic import replacing_folder

    with replacing_folder(path) as tmp:
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        processor.save_pretrained(tmp)


def build(root: Path, name: str, tiny: bool = False) -> Path:
    """Build (once) and return the folder of a random checkpoint of ``name``."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from vlm.zoo import build_tiny

    path = Path(root) / f"{name}_random{'_tiny' if tiny else ''}"
    if (path / "config.json").is_file():
        return path
    Path(root).mkdir(parents=True, exist_ok=True)
    remove_partial_builds(path)
    t0 = time.perf_counter()
    tiny_dir = build_tiny(SIZES[name]["zoo"], Path(root) / f"tiny_{SIZES[name]['zoo']}", seed=0)
    config = config_for(name, tiny)
    with torch.device("meta"):   # the size, before anything is allocated
        check_disk(path, sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters()))
    torch.manual_seed(0)
    # bf16 from the start, on the GPU where there is one (from_config allocates in the given dtype)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    if SIZES[name]["zoo"] == "gemma3":   # transformers zero-initialises this (vision cut off)
        from vlm.zoo.gemma3 import init_projection

        init_projection(model, 0)
    gen = json.loads((Path(tiny_dir) / "generation_config.json").read_text())
    model.generation_config = GenerationConfig(**{k: v for k, v in gen.items() if not k.startswith("_")
                                                  and k != "transformers_version"})
    t_init = time.perf_counter() - t0
    save_checkpoint(model, _processor(name, Path(tiny_dir), tiny), path)
    n = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"built {path.name}: {n / 1e9:.2f} B parameters, init {t_init:.0f} s, "
          f"write {time.perf_counter() - t0 - t_init:.0f} s", flush=True)
    return path
