"""The training recipe's config: one YAML per model × method under ``configs/``.

Sections: ``method``, ``model``, ``quant``, ``kernels``, ``lora``, ``data``, ``training``, ``output``,
``logging``, ``distributed``. ``method``: ``lora`` (LoRA / QLoRA on a 4-bit policy), ``full`` (every
language weight in bf16) or ``projector`` (LLaVA stage 1: the projector only); see vlm.train.modes.
Every key is checked (unknown → closest valid key; bad value → allowed values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm.config.schema import apply_overrides, choices, load_yaml, parse_section
from vlm.errors import ConfigError

LORA_TARGET_GROUPS = ("language.attention", "language.mlp", "vision", "projector")
NOT_QUANTIZED = ("bf16", "fp16", "none")   # quant values vlm.load reads as "16-bit, no policy"


@dataclass
class ModelSection:
    path: str
    dtype: str = choices("bf16", "fp16", "fp32", default="bf16")
    device: str | None = None
    # a projector-only safetensors (or the folder) from `method: projector`: the stage-2 start
    projector_init: str | None = None


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # groups (language.attention, language.mlp, vision, projector) and/or explicit module names
    targets: list[str] = field(default_factory=lambda: ["language.attention", "language.mlp"])
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False

    def validate(self, where: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{where}.r: must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"{where}.targets: give at least one of {', '.join(LORA_TARGET_GROUPS)} "
                              "or explicit module names")


@dataclass
class DataFile:
    path: str
    weight: float = 1.0


@dataclass
class DataSection:
    train: list[DataFile | str] = field(default_factory=list)
    image_root: str | None = None
    min_pixels: int | None = None       # image pixel limits (Qwen2-VL / Qwen3-VL processors)
    max_pixels: int | None = None
    longest_edge: int | None = None     # image longest side in px (Pixtral / Mistral 3 processors)
    video_fps: float = 2.0              # frames sampled per second of video (families that take video)
    video_max_frames: int = 32          # at most this many frames per video
    max_length: int = 2048
    overlong: str = choices("truncate", "drop", default="truncate",
                              doc="over-long samples: cut text only (never an image block) or drop")
    on_error: str = choices("raise", "skip", default="raise")
    train_on: str = choices("assistant", "last_assistant", "all", default="assistant")
    group_by_length: bool = True
    pad_to_multiple_of: int | None = 8
    # Micro-batches by tokens (vlm.data_formats.packing): each row holds up to this many tokens and
    # training.batch_size counts rows. With packing (auto: every family that can; Mllama cannot), several
    # samples share a row with their own positions and attention; without, samples of similar length
    # are grouped so that rows x longest <= budget. null: training.batch_size samples per micro-batch.
    max_tokens_per_batch: int | None = None
    packing: bool | str = choices("auto", True, False, default="auto")
    # packed rows are padded up to one of this many lengths (budget/n apart): few shapes for
    # torch.compile / CUDA graphs; padding per row < budget/n tokens
    length_buckets: int = 16
    # DataLoader worker processes (image decode, resize, processor): auto = min(4, cores/2) on a GPU, 0 on CPU
    num_workers: int | str = "auto"

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}.train: give at least one data file")
        self.train = [DataFile(path=f) if isinstance(f, str) else f for f in self.train]
        if self.max_length < 16:
            raise ConfigError(f"{where}.max_length: must be >= 16, got {self.max_length}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_length:
            raise ConfigError(f"{where}.max_tokens_per_batch: {self.max_tokens_per_batch} is below max_length "
                              f"{self.max_length}; a row must hold the longest sample")
        if self.packing is True and self.max_tokens_per_batch is None:
            raise ConfigError(f"{where}.packing: true needs data.max_tokens_per_batch (the row length)")
        if self.length_buckets < 1:
            raise ConfigError(f"{where}.length_buckets: must be >= 1, got {self.length_buckets}")
        if isinstance(self.num_workers, str) and self.num_workers != "auto" or \
                isinstance(self.num_workers, int) and self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: auto or an integer >= 0, got {self.num_workers!r}")
        if not self.video_fps > 0 or self.video_max_frames < 1:
            raise ConfigError(f"{where}.video_fps must be > 0 and video_max_frames >= 1, got "
                              f"{self.video_fps} and {self.video_max_frames}")


@dataclass
class TrainingSection:
    lr: float = 2e-4
    schedule: str = choices("cosine", "linear", "constant", "constant_with_warmup", default="cosine")
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 1
    # checkpoint the decoder layers (recompute in backward). auto: on, except method: full on a CUDA
    # device whose memory holds the step without it (vlm.train.checkpointing: Qwen2-VL-2B on an
    # 80-141 GB GPU), where the recompute buys nothing
    gradient_checkpointing: bool | str = choices("auto", True, False, default="auto")
    # torch.compile each language decoder layer (vlm.train.compile): on a GPU the eager step is
    # launch-bound; compiled layers fuse the LoRA/norm/RoPE glue (Qwen2-VL-2B LoRA on an H100: 2.4x
    # the eager step, benchmarks/NOTES.md). auto: on for CUDA (not under FSDP), off on CPU, where
    # the one-off compile costs more than a short run gains.
    compile: bool | str = choices("auto", True, False, default="auto")
    # compiled layers only: each decoder layer's MLP runs over this many token blocks, so its
    # backward holds ~1/n of the (tokens x intermediate) tensors at once (same function). Qwen2-VL-2B
    # LoRA on an H100 (benchmarks/NOTES.md): 2 blocks take 0.36 GiB off the peak for 15-20 % of step
    # time; on a 4-bit model each block dequantizes the MLP weights again (QLoRA: 0.33 GiB for ~35 %).
    mlp_chunks: int = 1
    # compiled layers replay from CUDA graphs (torch.compile mode "reduce-overhead"): no host cost per
    # kernel launch, which is what bounds a compiled step of a small model (Qwen2-VL-2B LoRA on an
    # H100: 4.9x HF+PEFT vs 3.7x without; with mlp_chunks: 2 both memory targets too, NOTES.md).
    # One graph is recorded per batch shape, so every batch is padded to data.max_length (a smaller
    # last batch records one more). Off by default: padding short samples to max_length costs compute
    # when lengths vary a lot. Needs compile (a GPU); ignored where compile is off.
    cuda_graphs: bool = False
    # packed rows (data.packing): attention runs per sample over the samples' boundaries (varlen:
    # flash-attention varlen kernels on a GPU, no mask; vlm.train.varlen_attention) or over the whole
    # row with transformers' L x L block mask (mask: the slower reference, for comparison).
    packed_attention: str = choices("varlen", "mask", default="varlen")
    optimizer: str = choices("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", default="adamw")
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = choices("bf16", "fp16", "fp32", default="bf16")
    seed: int = 42
    save_steps: int = 100
    save_total_limit: int = 3
    logging_steps: int = 1
    # method: full: train the vision tower too (the projector and language model always train)
    train_vision: bool = False
    # method full/projector on 16-bit weights: how BF16AdamW writes updates that bf16 cannot hold
    # (vlm.train.bf16_adamw): stochastic rounding (8 bytes/param in all) or Kahan compensation (10)
    bf16_update: str = choices("stochastic", "kahan", default="stochastic")

    def validate(self, where: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.cuda_graphs and self.compile is False:
            raise ConfigError(f"{where}.cuda_graphs: replays compiled layers, so it needs compile: auto or true")
        if self.mlp_chunks < 1:
            raise ConfigError(f"{where}.mlp_chunks: must be >= 1, got {self.mlp_chunks}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError(f"{where}: batch_size and grad_accum must be >= 1")
        if self.save_total_limit < 2:
            raise ConfigError(f"{where}.save_total_limit: must be >= 2 so a crash mid-save keeps the "
                              "previous checkpoint")


@dataclass
class DistributedSection:
    """Multi-process training (see vlm.train.distributed); ignored in a single process."""
    strategy: str = choices("auto", "ddp", "fsdp", default="auto",
                            doc="auto: FSDP when `accelerate launch` was given an FSDP config, else DDP")
    backend: str | None = None          # default: nccl on GPUs, gloo on CPU
    fsdp_version: int = choices(1, 2, default=2)
    fsdp_state_dict: str = choices("sharded", "full", default="sharded",
                                   doc="checkpoint format under FSDP; sharded (DCP) reshards N -> M")
    fsdp_cpu_offload: bool = False
    # true: each decoder layer's weights are freed after its forward and gathered again for its
    # backward (the memory case: 1/N of the frozen weights held). false: kept gathered from forward
    # to backward, no backward all-gathers, but every GPU holds the whole 16-bit model during the step
    # (LoRA: DDP's weight memory with FSDP's hooks; vlm.train.fsdp_units)
    fsdp_reshard_after_forward: bool = True
    # decoder layers per FSDP2 unit: each unit is one all-gather, one reduce-scatter and one set of
    # FSDP hooks per pass (host time: an eager or compiled LoRA step is host-bound in them at 2B), and
    # is held whole while it runs (memory). 0 (auto): as many consecutive layers as fit 512 MiB of
    # 16-bit weights (Qwen2-VL-2B: 5 per unit; 7B: 1, the memory layout); N: N per unit
    fsdp_layers_per_unit: int = 0
    # frozen vision towers (LoRA on the language model): shard (one FSDP unit, 1/N of its weights on
    # each process) or replicate (left out of FSDP: whole on every process, no unit, no hooks, no
    # all-gather; frozen, so nothing to reduce). Qwen2-VL's tower: +0.63 GiB per process; or blocks (a
    # unit per vision block, each gathered only while it runs, the next one prefetched: the tower's
    # forward holds ~2 blocks whole instead of all 32 — Qwen2-VL-7B: 0.08 GiB instead of 1.26 GiB —
    # for 32 more all-gathers and hooks per micro-batch; vlm.train.fsdp_units)
    fsdp_frozen_towers: str = choices("shard", "replicate", "blocks", default="shard")
    # bitsandbytes' 4-bit storage dtype. auto: the compute dtype (model.dtype) under FSDP (FSDP
    # shards only floating tensors), uint8 otherwise (bitsandbytes' default).
    quant_storage: str = choices("auto", "uint8", "bf16", "fp16", "fp32", default="auto")
    find_unused_parameters: bool = False

    def validate(self, where: str) -> None:
        if self.fsdp_layers_per_unit < 0:
            raise ConfigError(f"{where}.fsdp_layers_per_unit: 0 (auto) or a number of decoder layers >= 1, "
                              f"got {self.fsdp_layers_per_unit}")


@dataclass
class LoggingSection:
    tensorboard: bool = True
    report_to: list[str] = field(default_factory=list)
    progress: bool = True
    # [first, last] optimizer steps (1-based) recorded by torch.profiler into OUTPUT/profile.txt
    # (operators by device time) and profile_trace.json (vlm.train.profiling); null: no profiling
    profile_steps: list[int] | None = None

    def validate(self, where: str) -> None:
        if self.profile_steps is not None and (len(self.profile_steps) != 2 or not
                                               1 <= self.profile_steps[0] <= self.profile_steps[1]):
            raise ConfigError(f"{where}.profile_steps: [first, last] with 1 <= first <= last, "
                              f"got {self.profile_steps}")


@dataclass
class TrainConfig:
    model: ModelSection
    data: DataSection
    quant: Any = None            # preset name, dict or YAML path: see vlm.quant.policy
    kernels: bool = True
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output: str = "runs/train"
    logging: LoggingSection = field(default_factory=LoggingSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    method: str = choices("lora", "full", "projector", default="lora")

    def validate(self, where: str) -> None:
        if self.training.train_vision and self.method != "full":
            hint = ("put vision in lora.targets to adapt the tower" if self.method == "lora"
                    else "stage 1 trains the projector only")
            raise ConfigError(f"training.train_vision: applies to method: full (method is {self.method}: "
                              f"{hint})")
        # the policy is read here, with the rest of the config, so a bad one fails before the
        # output folder exists or a model is loaded (vlm.load parses it again from the same value)
        if self.quant is not None and not (isinstance(self.quant, str) and self.quant in NOT_QUANTIZED):
            from vlm.quant.policy import QuantPolicy

            QuantPolicy.parse(self.quant)


def parse_config(data: dict, overrides: list[str] | None = None) -> TrainConfig:
    data = apply_overrides(data, overrides or [])
    if isinstance(data.get("model"), str):
        data["model"] = {"path": data["model"]}
    return parse_section(TrainConfig, data)


def load_config(path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML (+ ``key=value`` overrides); relative data/model paths stay as written."""
    return parse_config(load_yaml(path), overrides)


def to_plain(obj: Any) -> Any:
    """A config (section) as plain JSON-able data."""
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
