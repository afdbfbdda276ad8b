"""bitsandbytes' two CPU paths for 4-bit layers (vlm.quant.cpu_path).

- The packed path's repack is plain torch code: its shape handling is driven on any CPU.
- The packed kernel runs only where the CPU has AVX512-BF16 (decided from /proc/cpuinfo).
- Every layer the project loads takes the portable path: eval-mode outputs equal the grad path's
  (the path every CPU and training take), for every zoo model and the demo base, nf4 and dynamic.
"""

from __future__ import annotations

import types

import pytest
import torch

from vlm.quant.cpu_path import cpu_has_avx512_bf16, packed_layout_fits, use_portable_cpu_path

bnb = pytest.importorskip("bitsandbytes")
AVX512_BF16 = cpu_has_avx512_bf16()
# (out_features, in_features): tiles of 32 rows and whole 64-value blocks, or not
SHAPES = [(64, 128), (32, 64), (48, 96), (96, 48), (128, 88), (352, 128), (128, 352), (64, 100)]


def _layer(out_f: int, in_f: int, *, double_quant: bool = False, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.bfloat16,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(out_f, in_f, generator=g) * 0.05,
                           "bias": torch.randn(out_f, generator=g) * 0.01}, strict=False)
    layer = layer.to("cpu")   # quantizes
    assert layer.weight.bnb_quantized
    return layer


def _x(in_f: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16)


def _portable(layer, x):
    """The portable path by its definition: dequantize, then a torch matmul in the compute dtype."""
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    return torch.nn.functional.linear(x, w, layer.bias.to(torch.bfloat16))


def test_bitsandbytes_sees_the_same_cpu_as_proc_cpuinfo():
    from bitsandbytes.functional import has_avx512bf16

    assert bool(has_avx512bf16()) == AVX512_BF16


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_repack_shape_handling_matches_packed_layout_fits(out_f, in_f, double_quant):
    """bitsandbytes' repack (torch code, runs on any CPU) succeeds exactly for the shapes
    ``packed_layout_fits`` admits, and its inverse gives the codes back."""
    from bitsandbytes.functional import (_convert_weight_packed_for_cpu,
                                         _convert_weight_packed_for_cpu_inverse)

    layer = _layer(out_f, in_f, double_quant=double_quant)
    codes = layer.weight.data.clone()
    state = layer.weight.quant_state
    fits = packed_layout_fits(out_f, in_f, state.blocksize)
    assert fits == (out_f % 32 == 0 and in_f % 64 == 0)
    if not fits:
        with pytest.raises((RuntimeError, AssertionError)):
            _convert_weight_packed_for_cpu(codes.clone(), state)
        return
    packed, packed_state = _convert_weight_packed_for_cpu(codes.clone(), state)
    assert packed.shape == (out_f, in_f // 2) and packed_state.packing_format_for_cpu
    back, _ = _convert_weight_packed_for_cpu_inverse(packed, packed_state)
    assert torch.equal(back, codes)


@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_eval_no_grad_takes_the_portable_path(out_f, in_f):
    """After use_portable_cpu_path, eval mode without grad computes exactly what training computes
    (on this CPU, whatever its instruction set), and the weight stays in its saved layout."""
    layer = _layer(out_f, in_f, double_quant=True)
    codes = layer.weight.data.clone()
    x = _x(in_f)
    assert use_portable_cpu_path(torch.nn.Sequential(layer)) == 1
    layer.train()
    with torch.enable_grad():
        trained = layer(x.clone().requires_grad_(True)).detach()
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
        again = layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, codes)
    assert torch.equal(evaluated, trained) and torch.equal(again, trained)
    assert torch.equal(evaluated, _portable(layer, x))


@pytest.mark.skipif(not AVX512_BF16, reason="bitsandbytes' packed CPU kernel needs avx512_bf16 "
                                            "(not in /proc/cpuinfo here)")
def test_packed_kernel_on_this_cpu_and_why_the_project_avoids_it():
    """What bitsandbytes does on its own on an AVX512-BF16 CPU: repacks in eval/no-grad, computes
    close to but not the portable numbers, changes what a save writes, crashes on shapes the layout
    cannot hold; use_portable_cpu_path refuses a layer already repacked."""
    from vlm.errors import VlmError

    layer = _layer(64, 128, double_quant=True)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _x(128)
    reference = _portable(layer, x)
    layer.eval()
    with torch.no_grad():
        packed_out = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu, "bitsandbytes took its packed path"
    assert packed_out.shape == reference.shape and not torch.equal(packed_out, reference)
    torch.testing.assert_close(packed_out.float(), reference.float(), rtol=0.05, atol=0.05)
    with pytest.raises(VlmError, match="already repacked"):
        use_portable_cpu_path(torch.nn.Sequential(layer))
    resaved = layer.state_dict()   # bitsandbytes unpacks to save: the statistics came back changed
    assert not torch.equal(resaved["weight.absmax"], saved["weight.absmax"])

    odd = _layer(48, 96)
    odd.eval()
    with torch.no_grad(), pytest.raises((RuntimeError, AssertionError)):
        odd(_x(96))


def test_peft_wrapped_layers_and_models_without_4bit_layers():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(_layer(48, 96), torch.nn.Linear(48, 8, dtype=torch.bfloat16))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["0"]))
    assert use_portable_cpu_path(peft) == 1
    assert use_portable_cpu_path(torch.nn.Linear(4, 4)) == 0
    peft.eval()
    with torch.no_grad():
        out = peft(_x(96))
    assert out.shape == (3, 5, 8)


def _zoo_sources():
    from vlm.zoo import VARIANTS
    from vlm.zoo.demo_base import SHIPPED

    return [*VARIANTS, "demo_base"], SHIPPED


ZOO_NAMES, DEMO_BASE = _zoo_sources()


@pytest.mark.parametrize("quant", ["nf4", "dynamic"])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_model_and_the_demo_base_generate_in_4bit_eval(name, quant, tiny_checkpoint):
    """Each zoo model and the shipped demo base, loaded by vlm.load in 4-bit, generate in eval mode,
    and their eval/no-grad logits equal the grad path's (the same numbers on every CPU)."""
    from vlm.data_formats.synthetic import Scene, render_scene
    from vlm.eval.generation import GenerationSettings, chat_text, generate_captions

    import vlm

    path = DEMO_BASE if name == "demo_base" else tiny_checkpoint(name)
    model, processor = vlm.load(path, device="cpu", dtype="bf16", quant=quant)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    saved = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("weight", "absmax"))}
    model.eval()

    scenes = [Scene("circle", "red", "large", "top left"), Scene("square", "blue", "small", "center")]
    items = [types.SimpleNamespace(image=render_scene(s, image_size=size), prompt="Describe the image.")
             for s, size in zip(scenes, (112, 84))]   # mixed image sizes
    result = generate_captions(model, processor, items, GenerationSettings(max_new_tokens=6, batch_size=1))
    assert len(result.captions) == 2 and all(isinstance(c, str) for c in result.captions)
    assert all(n > 0 for n in result.num_tokens)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in saved.items()), "generation changed saved weights"

    inputs = processor(text=[chat_text(processor, "Describe the image.")], images=[items[0].image],
                       return_tensors="pt")
    with torch.no_grad():
        evaluated = model(**inputs).logits
    with torch.enable_grad():
        graded = model(**inputs).logits.detach()   # eval mode, grad on: bitsandbytes' portable path
    assert torch.isfinite(evaluated).all()
    assert torch.equal(evaluated, graded)
