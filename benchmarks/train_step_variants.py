"""The setups compared by benchmarks/train_step.py: HF baselines (a, b, c), vlmtune (d, e), ablations.

``setup(variant, args, batches)`` builds one in the worker process: model, optimizer, info dict.
The vlmtune variants that are a configuration of ``vlm train`` (:data:`SHIPPED`) are built by the
product's own ``vlm.train.fast_path.resolve`` + ``apply`` from the same config keys (kernels,
training.compile / cuda_graphs / mlp_chunks), so what is measured is what ships; only ablations
(removing or swapping one piece) are assembled by hand in :func:`ablation`.
"""

from __future__ import annotations

from train_step_workload import LORA_LEAVES, frozen_16bit_modules, shapes

VARIANTS = {
    "a": "transformers + PEFT, grad. checkpointing",
    "b": "(a) + bitsandbytes NF4 language linears",
    "c": "(a) + Liger-Kernel",
    "d": "vlmtune 16-bit LoRA",
    "e": "vlmtune QLoRA (dynamic policy)",
    "d_eager": "(d) without torch.compile (our Triton layer kernels instead)",
    "e_eager": "(e) without torch.compile (our Triton layer kernels instead)",
    "d_ro": "(d) + CUDA graphs (training.cuda_graphs: true)",
    "e_ro": "(e) + CUDA graphs (training.cuda_graphs: true)",
    "d_evis": "(d) with the frozen vision tower eager (compiled language layers only)",
    "e_evis": "(e) with the frozen vision tower eager (compiled language layers only)",
    "d_hfck": "(d) with HF's checkpoint around the compiled layer",
    "d_novis": "(d) with HF's image-by-image vision attention (tower eager)",
    "d_gc2": "(d), checkpointing every 2nd layer only",
    "d_mlp2": "(d), each layer's MLP over 2 token blocks",
    "d_mlp4": "(d), each layer's MLP over 4 token blocks",
    "e_mlp2": "(e), each layer's MLP over 2 token blocks",
    "e_mlp4": "(e), each layer's MLP over 4 token blocks",
    "d_cpp": "(d) with inductor's C++ wrapper (no Python per kernel call)",
    "d_ro_mlp2": "(d) + training.cuda_graphs: true, mlp_chunks: 2",
    "e_ro_mlp2": "(e) + training.cuda_graphs: true, mlp_chunks: 2",
    "d_old": "(d_eager) before the frozen-tower and cast fixes",
    "d_cast": "(d_eager) with PEFT's input cast (before the cast fix)",
    "d_nokern": "(d_eager) without vlm.kernels.patch",
    "d_nogc": "(d_eager) without gradient checkpointing",
}
EAGER = ("d_eager", "e_eager", "d_old", "d_cast", "d_nokern", "d_nogc")


def _hf_lora(model, gc: bool):
    from peft import LoraConfig, get_peft_model

    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=r"model\.language_model\..*\.(" + "|".join(LORA_LEAVES) + ")")
    return get_peft_model(model, cfg)


# vlmtune variants that are a shipped configuration: built by vlm.train.fast_path itself
SHIPPED = ("d", "e", "d_eager", "e_eager", "d_ro", "e_ro", "d_mlp2", "d_mlp4", "e_mlp2", "e_mlp4",
           "d_ro_mlp2", "e_ro_mlp2")


def step_config(variant: str, args):
    """The TrainConfig keys that select this variant's fast path (kernels, compile, CUDA graphs, MLP
    blocks); everything else at its default."""
    from vlm.train.config import parse_config

    flags = set(variant.split("_")[1:])
    chunks = [int(f[3:]) for f in flags if f.startswith("mlp")] or [1]
    seq = shapes(args.model, args.tiny)["seq"]
    return parse_config({"model": {"path": args.ckpt}, "data": {"train": ["(batches built in memory)"],
                                                                "max_length": max(16, seq)},
                         "kernels": True,
                         "training": {"compile": variant not in EAGER, "cuda_graphs": "ro" in flags,
                                      "mlp_chunks": chunks[0]}})


def ablation(variant: str, flags: set, model, family, info: dict) -> None:
    """Variants that ship nowhere (what an ablation removes or changes), set up by hand from the
    same building blocks fast_path uses."""
    import vlm.kernels

    compiled = variant not in EAGER
    if variant not in ("d_novis", "d_old", "d_cast", "d_nokern", "d_nogc"):
        from vlm.vision_attention import batch_equal_images

        info["vision_attention_batched"] = batch_equal_images(model, family)
    if variant != "d_nokern":
        from vlm.train.compile import kernel_patch_options

        info["patch"] = str(vlm.kernels.patch(model, family, **kernel_patch_options(compiled)))
    if not compiled:
        return
    from vlm.train.compile import compile_language_layers, compile_vision_blocks, language_layers

    if "cpp" in flags:
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
    info["compiled_layers"] = compile_language_layers(model, family, checkpoint_inside="hfck" not in flags)
    if not flags & {"evis", "novis"}:   # frozen vision blocks compiled, as vlm train does
        info["compiled_vision_blocks"] = compile_vision_blocks(model, family)
    if "gc2" in flags:   # selective: checkpoint layers 0, 2, 4, ...
        for i, layer in enumerate(language_layers(model, family)):
            layer.gradient_checkpointing = i % 2 == 0


def setup(variant: str, args, batches):
    import torch
    from transformers import AutoModelForImageTextToText

    dtype, dev = torch.bfloat16, args.device
    info = {}
    if variant in ("a", "b", "c"):
        kw = {}
        if variant == "b":
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=frozen_16bit_modules(args.model))
        if variant == "c":
            import liger_kernel.transformers as liger

            # before the model is built: patches the classes
            from vlm.load import load_config

            # Liger names its patch functions by transformers' model_type (qwen2_vl, qwen3_vl, llava, ...)
            arch = load_config(args.ckpt).model_type
            if not hasattr(liger, f"apply_liger_kernel_to_{arch}"):
                raise RuntimeError(f"liger-kernel {getattr(liger, '__version__', '?')} has no "
                                   f"apply_liger_kernel_to_{arch}")
            getattr(liger, f"apply_liger_kernel_to_{arch}")()
            import liger_kernel
            info["liger_version"] = getattr(liger_kernel, "__version__", None)
        model = AutoModelForImageTextToText.from_pretrained(args.ckpt, dtype=dtype, device_map=dev, **kw)
        model = _hf_lora(model, gc=True)
    else:
        import vlm.kernels
        from vlm.lora import apply_lora

        quant = "dynamic" if variant.startswith("e") else None
        cal = None
        if quant == "dynamic":   # two single-sample calibration batches from W (without labels)
            per = batches[0]["pixel_values"].shape[0] // shapes(args.model, args.tiny)["batch"]
            cal = [{k: (v[:per] if k == "pixel_values" else v[:1]) for k, v in b.items() if k != "labels"}
                   for b in batches[:2]]
        # vlm.load minus the processor (the random checkpoint has no tokenizer files)
        from vlm.families import family_for_config
        from vlm.load import load_config
        from vlm.quant.loading import load_quantized

        config = load_config(args.ckpt)
        family = family_for_config(config)
        if quant is None:
            model = AutoModelForImageTextToText.from_pretrained(args.ckpt, dtype=dtype).to(dev)
        else:
            model = load_quantized(args.ckpt, config=config, family=family, quant=quant, dtype=dtype,
                                   device=dev, calibration=cal)
        model.vlm_family = family
        gc = variant != "d_nogc"
        model = apply_lora(model, model.vlm_family, r=16, alpha=16,
                           targets=["language.attention", "language.mlp"], gradient_checkpointing=gc,
                           warn=False, frozen_vision_no_grad=variant != "d_old",
                           skip_cast_under_autocast=variant not in ("d_old", "d_cast"))
        if variant == "d_old":   # what apply_lora did before: HF's hook, vision tower included
            model.get_base_model().enable_input_require_grads()
        flags = set(variant.split("_")[1:])
        if variant in SHIPPED:
            # what `vlm train` runs: the product's own resolve + apply, from the same config keys
            from vlm.train import fast_path

            cfg = step_config(variant, args)
            step_plan = fast_path.resolve(cfg, dev, "single")
            done = fast_path.apply(model, family, cfg, step_plan, [shapes(args.model, args.tiny)["seq"]])
            info["vision_attention_batched"] = done.vision_attention_batched
            info["patch"] = str(done.kernels)
            if step_plan.compiled:
                info["compiled_layers"] = done.compiled_layers
                info["compiled_vision_blocks"] = done.compiled_vision_blocks
            if done.mlp_chunks > 1:
                info["mlp_chunks"] = done.mlp_chunks
        else:
            ablation(variant, flags, model, family, info)
        plan = getattr(model.get_base_model(), "vlm_quant_plan", None)
        if plan is not None:
            info["quantized_by_component"] = plan.count_by_component()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    fused = dev.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=2e-4, fused=fused)
    return model, opt, info
