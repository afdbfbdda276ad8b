"""``training.gradient_checkpointing: auto``: checkpoint the decoder layers only where memory needs it.

Checkpointing keeps each layer's input and recomputes the layer in backward: the activation memory of
a step drops to ~1/layers, for one more forward of every layer (~1/3 more language-model matmul work,
plus its launches). For LoRA that trade is measured and kept (the LoRA tables of benchmarks/NOTES.md
ran with it). For ``method: full`` the weights, gradients and optimizer states already dominate the
memory (8 bytes per trained parameter with BF16AdamW), and at 2B on an 80-141 GB GPU the saved
activations of a whole step fit beside them several times over, so the recompute buys nothing.

The rule (``method: full``, one CUDA device or DDP): estimate the step's peak without checkpointing

    resident    = Σ weight bytes + trained parameters × (gradient + optimizer bytes per parameter)
    activations = tokens per micro-batch × decoder layers × (6·hidden + 2·kv_width + 3·intermediate) × 2 B

(per token and layer a compiled decoder layer saves, in bf16: the inputs of the two norms, of q/k/v,
of o_proj and of gate/up (~6·hidden), k and v (2·kv_width), gate, up and their product
(3·intermediate)) and turn checkpointing off when resident + 1.25 × activations ≤ 60 % of the
device's memory. The margin covers what the formula leaves out (the fused CE's chunk, a compiled
layer's temporaries, allocator fragmentation). Tokens per micro-batch: ``training.batch_size`` ×
``data.max_tokens_per_batch`` (packed rows) or × ``data.max_length``, an upper bound.
Qwen2-VL-2B, 8 × 512 tokens: resident 13.9 GB, activations 8.4 GB → 24.4 GB ≤ 0.6 × 80 GB: off (on a
40 GB GPU: on; 4 × 2048 tokens: 34.9 GB, off from 80 GB up).

Everything else keeps checkpointing on, as before: ``lora`` and ``projector`` (measured with it), CPU
(tests and demos were measured with it; CPU memory is the user's RAM), FSDP (sharding is chosen when
memory is tight; per-process activations are not sharded) and ``training.train_vision`` (the
tower's activations are not in the estimate). ``true`` / ``false`` are taken as given.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATION_MARGIN = 1.25
DEVICE_SHARE = 0.6


@dataclass(frozen=True)
class Decision:
    enabled: bool
    reason: str

    def line(self) -> str:
        return f"gradient checkpointing: {'on' if self.enabled else 'off'} ({self.reason})"


def optimizer_bytes(cfg) -> float:
    """Optimizer state per trained 16-bit parameter (vlm.train.bf16_adamw): bf16 moments 4 B, 8-bit
    moments 2.03 B, Kahan compensation 2 B more."""
    state = 2.03 if cfg.training.optimizer == "adamw_8bit" else 4.0
    return state + (2.0 if cfg.training.bf16_update == "kahan" else 0.0)


def tokens_per_micro_batch(cfg) -> int:
    per_row = cfg.data.max_tokens_per_batch or cfg.data.max_length
    return cfg.training.batch_size * per_row


def activation_bytes(text_config, tokens: int) -> int:
    """Saved activations of ``tokens`` through every decoder layer without checkpointing (bf16)."""
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_width = (getattr(text_config, "num_key_value_heads", None) or heads) * head_dim
    per_token_layer = 6 * hidden + 2 * kv_width + 3 * text_config.intermediate_size
    return tokens * text_config.num_hidden_layers * per_token_layer * 2


def estimate(model, cfg) -> dict[str, int]:
    """Bytes of the step without checkpointing: resident (weights, grads, optimizer) and activations."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    resident = weights + sum(p.numel() * (p.element_size() + optimizer_bytes(cfg)) for p in trained)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"resident": int(resident), "activations": activation_bytes(text, tokens_per_micro_batch(cfg))}


def resolve(model, cfg, device: str, strategy: str, device_bytes: int | None = None) -> Decision:
    """``training.gradient_checkpointing`` for this run (module docstring). Call after the trained
    parameters are set (``vlm.train.modes.set_trainable``); ``device_bytes``: the device's memory
    (default: read from CUDA)."""
    setting = cfg.training.gradient_checkpointing
    if setting != "auto":
        return Decision(bool(setting), "training.gradient_checkpointing: " + str(setting).lower())
    if cfg.method != "full":
        return Decision(True, f"auto: method {cfg.method} keeps it")
    if not str(device).startswith("cuda"):
        return Decision(True, "auto: on for CPU runs")
    if strategy == "fsdp":
        return Decision(True, "auto: on under FSDP")
    if cfg.training.train_vision:
        return Decision(True, "auto: on with training.train_vision (tower activations not estimated)")
    if device_bytes is None:
        import torch

        device_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
    est = estimate(model, cfg)
    need = est["resident"] + ACTIVATION_MARGIN * est["activations"]
    budget = DEVICE_SHARE * device_bytes
    gb = 1e9
    why = (f"auto: weights+grads+optimizer {est['resident'] / gb:.1f} GB + {ACTIVATION_MARGIN} × activations "
           f"{est['activations'] / gb:.1f} GB of {tokens_per_micro_batch(cfg):,} tokens per micro-batch "
           f"{'≤' if need <= budget else '>'} {DEVICE_SHARE:.0%} of {device_bytes / gb:.0f} GB")
    return Decision(need > budget, why)
