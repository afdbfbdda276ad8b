"""The evaluation recipe, top to bottom:

1. read the eval file → images or videos with prompts and reference captions (:mod:`vlm.eval.data`);
   video items are refused by name before any model loads when the model's family takes no video;
2. for each variant (``bf16`` baseline first, then e.g. ``nf4``, ``dynamic``): load the model with
   ``vlm.load(..., quant=variant)``, put the PEFT adapter on it when one is given, generate greedy
   captions (:mod:`vlm.eval.generation`) and run the teacher-forced pass over the reference captions
   (:mod:`vlm.eval.agreement`: the baseline's log-probs are recorded, the others compared to them);
   free the model before loading the next;
3. optionally the same requests to an OpenAI-compatible endpoint (:mod:`vlm.eval.endpoint`);
4. text metrics (:mod:`vlm.eval.metrics`), CLIPScore when weights are given (:mod:`vlm.eval.clipscore`),
   exact-match agreement with the baseline's captions, and, for the synthetic scenes of
   ``vlm.data_formats.synthetic`` (``scene_vocab``), per-attribute accuracy;
5. the report (:mod:`vlm.eval.report`).

Variant names: ``bf16`` / ``fp16`` / ``fp32`` load 16/32-bit weights; anything else (``nf4``,
``dynamic``, a policy YAML path) is passed to ``vlm.load`` as ``quant=`` (stored in 4-bit where the
policy says so, computing in bf16). ``gguf:f16|q8_0|q4_k_m`` exports the model (+ adapter) to GGUF and
runs it in llama.cpp (:mod:`vlm.eval.gguf_variant`). A name given twice is loaded twice (``bf16,bf16`` checks that two
loads decode identically); the second copy is reported as ``bf16#2``.
"""

from __future__ import annotations

import os

import gc
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vlm.config.schema import parse_section
from vlm.data_formats import problems
from vlm.data_formats.video import DEFAULT_VIDEO_FPS, DEFAULT_VIDEO_MAX_FRAMES, VideoSampling
from vlm.errors import ConfigError, DataError, VlmError
from vlm.eval.agreement import LogprobStore, compare_teacher_forced, exact_match_rate
from vlm.eval.data import read_eval_items
from vlm.eval.generation import GenerationResult, GenerationSettings, generate_captions
from vlm.eval.gguf_variant import is_gguf, run_gguf_variant
from vlm.eval.metrics import caption_metrics, java_available

BASELINE = "bf16"
DTYPE_VARIANTS = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass
class EvalConfig:
    """Everything ``vlm eval`` takes (CLI flags or a YAML file with these keys)."""

    data: str
    model: str | None = None
    adapter: str | None = None
    compare: list[str] = field(default_factory=lambda: [BASELINE])
    endpoint: str | None = None
    served_model: str | None = None
    out: str = "eval_out"
    prompt: str | None = None
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    batch_size: int = 8
    device: str | None = None
    image_root: str | None = None
    limit: int | None = None
    meteor: bool = True
    spice: bool | None = None
    clip_model: str = "ViT-B-32"
    clip_weights: str | None = None
    scene_vocab: str | None = None     # synthetic scenes: per-attribute accuracy in this vocabulary
    endpoint_timeout: float = 120.0
    api_key: str | None = None          # bearer token for the endpoint (vlm serve --api-key)
    endpoint_concurrency: int = 1
    video_fps: float = DEFAULT_VIDEO_FPS              # video items: frames per second, as `vlm train` samples
    video_max_frames: int = DEFAULT_VIDEO_MAX_FRAMES  # video items: at most this many frames per video

    def validate(self, where: str = "eval") -> None:
        if not self.model and not self.endpoint:
            raise ConfigError("give --model PATH (local variants) and/or --endpoint URL --served-model NAME")
        if self.endpoint and not self.served_model:
            raise ConfigError("--endpoint needs --served-model NAME (the model or adapter name the server serves)")
        if self.adapter and not self.model:
            raise ConfigError("--adapter needs --model (the base checkpoint it was trained on)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"{where}.min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}.limit must be >= 1, got {self.limit}")
        if not self.video_fps > 0 or self.video_max_frames < 1:
            raise ConfigError(f"{where}.video_fps must be > 0 and video_max_frames >= 1, got "
                              f"{self.video_fps} and {self.video_max_frames}")

    @classmethod
    def from_dict(cls, data: dict) -> "EvalConfig":
        return parse_section(cls, data, "eval")

    def settings(self) -> GenerationSettings:
        return GenerationSettings(self.max_new_tokens, self.min_new_tokens, self.batch_size, self.prompt)


def variant_names(compare: list[str], with_baseline: bool) -> list[tuple[str, str]]:
    """``["nf4", "bf16", "bf16"]`` → ``[("bf16", "bf16"), ("nf4", "nf4"), ("bf16#2", "bf16")]``:
    (report name, spec), the baseline first (added when missing)."""
    specs = [s.strip() for s in compare if s.strip()]
    if with_baseline and BASELINE not in specs:
        specs.insert(0, BASELINE)
    if BASELINE in specs:
        specs.remove(BASELINE)
        specs.insert(0, BASELINE)
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        seen[s] = seen.get(s, 0) + 1
        out.append((s if seen[s] == 1 else f"{s}#{seen[s]}", s))
    return out


def load_variant(model_path: str, spec: str, adapter: str | None, device: str | None):
    """(model, processor) for one variant: ``vlm.load`` with the variant's dtype/quant, + adapter."""
    # the function, not ``vlm.load``: once the submodule vlm/load.py is imported, that attribute of
    # the package is the module
    from vlm.load import load

    from vlm.vision_attention import batch_equal_images

    if spec in DTYPE_VARIANTS:
        model, processor = load(model_path, dtype=DTYPE_VARIANTS[spec], device=device)
    else:
        model, processor = load(model_path, dtype="bf16", device=device, quant=spec)
    batch_equal_images(model, model.vlm_family)   # same captions, one attention call per vision block
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise VlmError(f"--adapter {adapter} has no adapter_config.json: give the PEFT adapter folder "
                           "that `vlm train` / `vlm export` wrote")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    model.eval()
    return model, processor


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _variant_record(name: str, spec: str, kind: str, gen: GenerationResult, config: EvalConfig) -> dict:
    return {
        "name": name, "spec": spec, "kind": kind,
        "adapter": config.adapter if kind == "local" else None,
        "example_caption": gen.captions[0] if gen.captions else None,
        "memory": {"model_bytes": gen.model_bytes, "peak_bytes": gen.peak_bytes, "peak_kind": gen.peak_kind},
        "speed": {"tokens_per_s": gen.tokens_per_s, "generated_tokens": sum(gen.num_tokens),
                  "seconds": gen.seconds},
        "metrics": {}, "clipscore": None, "agreement": None, **({"extra": gen.extra} if gen.extra else {}),
    }


def run_eval(config: EvalConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the whole evaluation and write the report; returns the ``results.json`` content."""
    from vlm.eval.report import write_report

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config.validate()
    notices: list[str] = []
    items = read_eval_items(config.data, image_root=config.image_root, limit=config.limit,
                            video_sampling=VideoSampling(config.video_fps, config.video_max_frames))
    refuse_video_where_not_taken(config, items)
    n_video = sum(it.media == "video" for it in items)
    log(f"eval: {len(items) - n_video} images, {n_video} videos, {sum(len(i.references) for i in items)} "
        f"reference captions from {config.data}")
    settings = config.settings()

    results: dict = {"config": asdict(config), "num_items": len(items), "num_videos": n_video,
                     "baseline": None, "variants": [],
                     "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                     "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    generations: dict[str, GenerationResult] = {}
    store = LogprobStore() if config.model else None
    try:
        if config.model:
            results["baseline"] = BASELINE
            for name, spec in variant_names(config.compare, with_baseline=True):
                if is_gguf(spec):   # exported with `vlm export --gguf`, run by llama.cpp
                    log(f"eval: {name}: exporting {config.model} to GGUF, running it in llama.cpp")
                    gen, tf = run_gguf_variant(spec, config.model, config.adapter, items, settings, store)
                    rec = _variant_record(name, spec, "gguf", gen, config)
                    rec["teacher_forced"] = {k: tf[k] for k in ("teacher_forced_accuracy", "caption_tokens")}
                    rec["agreement"] = {"kl_mean": tf["kl_mean"], "top1_agreement": tf["top1_agreement"]}
                    results["variants"].append(rec)
                    generations[name] = gen
                    continue
                log(f"eval: {name}: loading {config.model}" + (f" + adapter {config.adapter}" if config.adapter else ""))
                model, processor = load_variant(config.model, spec, config.adapter, config.device)
                gen = generate_captions(model, processor, items, settings)
                log(f"eval: {name}: {sum(gen.num_tokens)} tokens in {gen.seconds:.2f} s; teacher-forced pass")
                is_base = name == BASELINE
                tf = compare_teacher_forced(model, processor, items, settings,
                                            baseline=None if is_base else store, record=store if is_base else None)
                _free(model)
                rec = _variant_record(name, spec, "local", gen, config)
                rec["teacher_forced"] = {"teacher_forced_accuracy": tf["teacher_forced_accuracy"],
                                         "caption_tokens": tf["caption_tokens"]}
                if not is_base:
                    rec["agreement"] = {"kl_mean": tf["kl_mean"], "top1_agreement": tf["top1_agreement"]}
                results["variants"].append(rec)
                generations[name] = gen
        if config.endpoint:
            from vlm.eval.endpoint import EndpointClient

            name = f"endpoint:{config.served_model}"
            log(f"eval: {name}: {config.endpoint}")
            add_bos = False
            if config.model:   # the local checkpoint says whether its template writes the BOS
                from transformers import AutoProcessor

                from vlm.eval.endpoint import template_omits_bos

                add_bos = template_omits_bos(AutoProcessor.from_pretrained(config.model))
                if add_bos:
                    log(f"eval: {name}: the chat template writes no BOS and the local model reads one: "
                        "requests set add_special_tokens (vLLM's chat API adds none by default)")
            client = EndpointClient(config.endpoint, config.served_model, timeout=config.endpoint_timeout,
                                    concurrency=config.endpoint_concurrency, add_special_tokens=add_bos,
                                    api_key=config.api_key or os.environ.get("VLM_API_KEY"))
            gen = client.generate(items, settings)
            results["variants"].append(_variant_record(name, config.served_model, "endpoint", gen, config))
            generations[name] = gen
            if not config.model:
                notices.append("no --model: agreement with a local bf16 baseline is not computed")
            else:
                notices.append(f"{name}: KL/top-1 need logits, which the endpoint does not return; "
                               "only exact-match agreement is reported")
    finally:
        if store is not None:
            store.close()

    references = [it.references for it in items]
    base_caps = generations[BASELINE].captions if BASELINE in generations else None
    meteor_scorer = None
    if config.meteor and java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        meteor_scorer = Meteor()   # one JVM (~30 s to start) for every variant
    for rec in results["variants"]:
        gen = generations[rec["name"]]
        log(f"eval: {rec['name']}: metrics")
        rec["metrics"] = caption_metrics(gen.captions, references, meteor=config.meteor, spice=config.spice,
                                         notices=notices, meteor_scorer=meteor_scorer)
        if config.scene_vocab:
            rec["attributes"] = _attribute_scores(config.scene_vocab, gen.captions, items)
        if base_caps is not None and rec["name"] != BASELINE:
            rec["agreement"] = {"exact_match": exact_match_rate(gen.captions, base_caps), **(rec["agreement"] or {})}
    del meteor_scorer
    _clipscore(config, items, results, generations, notices)
    results["notices"] = list(dict.fromkeys(notices))
    for n in results["notices"]:
        log(f"note: {n}")
    paths = write_report(config.out, results, items, generations)
    log(f"eval: wrote {', '.join(str(p) for p in paths.values())}")
    return results


def refuse_video_where_not_taken(config: EvalConfig, items) -> None:
    """Before any model loads: video items need a local model whose family takes video, and no GGUF
    variant (llama.cpp's runtime here takes images only). The error names the first video record
    and how many there are. An endpoint-only run is checked by the server (its error names the record)."""
    videos = [it for it in items if it.media == "video"]
    if not videos or not config.model:
        return
    from vlm.families import family_for_config
    from vlm.families.registry import video_family_names
    from vlm.load import load_config

    family = family_for_config(load_config(config.model))
    more = f" (and {len(videos) - 1} more video record(s))" if len(videos) > 1 else ""
    if not family.takes_video:
        raise DataError(f"the record holds a video{more}, but {config.model} is a {family.name} model, "
                        f"which takes no video (families that do: {', '.join(video_family_names())}); "
                        "evaluate video on one of those, or remove the video records",
                        code=problems.VIDEO_UNSUPPORTED, **videos[0].where)
    gguf = [s for s in config.compare if is_gguf(s.strip())]
    if gguf:
        raise DataError(f"the record holds a video{more}, but the GGUF variant {gguf[0]} runs in llama.cpp, "
                        "which takes images only here: drop the gguf variants or the video records",
                        code=problems.VIDEO_UNSUPPORTED, **videos[0].where)


def _attribute_scores(vocab_name: str, captions: list[str], items) -> dict:
    """Per-attribute accuracy of synthetic-scene captions against each image's first reference
    (``vlm.data_formats.caption_attributes``: exact match, all attributes right, each attribute)."""
    from vlm.data_formats.caption_attributes import caption_scores
    from vlm.data_formats.scene_vocab import VOCABS

    if vocab_name not in VOCABS:
        raise ConfigError(f"scene_vocab {vocab_name!r} is not one of {', '.join(VOCABS)}")
    return caption_scores(captions, [it.references[0] for it in items], VOCABS[vocab_name])


def _clipscore(config: EvalConfig, items, results: dict, generations: dict, notices: list[str]) -> None:
    if not config.clip_weights and not config.clip_model.startswith("hf-hub:"):
        notices.append("CLIPScore skipped: no CLIP weights given (--clip-weights FILE|TAG or "
                       "--clip-model hf-hub:org/name)")
        return
    from vlm.eval.clipscore import ClipScorer

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # CLIPScore compares one image with its caption: video items have no single image, so it is
    # computed over the image items and the report says how many videos it leaves out
    scored = [i for i, it in enumerate(items) if it.media == "image"]
    if len(scored) < len(items):
        notices.append(f"CLIPScore covers the {len(scored)} image items only: it scores one image, "
                       f"so the {len(items) - len(scored)} video items are left out")
    if not scored:
        return
    scorer = ClipScorer(config.clip_model, config.clip_weights, device=device)
    results["clipscore"] = scorer.describe()
    images = [items[i].image for i in scored]
    for rec in results["variants"]:
        captions = generations[rec["name"]].captions
        rec["clipscore"] = scorer(images, [captions[i] for i in scored])
