"""Eval and calibration prompts carry one BOS, as training and vLLM do: a template that writes the
BOS itself (Mistral 3, Pixtral, LLaVA, Gemma 3, Llama) gets none added by the tokenizer. For every
zoo family (by the registry); with the processor's default the model read two BOS at eval time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from vlm.zoo import VARIANTS


def _leading_bos(ids, bos_id) -> int:
    n = 0
    while n < len(ids) and ids[n] == bos_id:
        n += 1
    return n


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eval_and_calibration_prompts_have_one_bos(tiny_checkpoint, variant):
    import vlm
    from vlm.eval.generation import chat_text, processor_inputs
    from vlm.quant.calibration import render

    model, processor = vlm.load(str(tiny_checkpoint(variant)), dtype="fp32", device="cpu")
    bos = processor.tokenizer.bos_token_id
    if bos is None:
        pytest.skip(f"{variant}: the tokenizer has no BOS")
    image = Image.new("RGB", (64, 48), (30, 140, 90))
    text = chat_text(processor, "Describe the image.")
    ids = processor_inputs(model, processor, [text], [SimpleNamespace(image=image, video=None)])["input_ids"][0]
    assert _leading_bos(ids.tolist(), bos) <= 1, (variant, ids[:4].tolist())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a green card"}]}]
    calib = render(processor, messages, [image])["input_ids"][0]
    assert _leading_bos(calib.tolist(), bos) <= 1, (variant, calib[:4].tolist())
