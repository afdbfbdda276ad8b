"""The LLaVA-1.5 projector GGUF: CLIP tower + MLP projector through llama.cpp's CLIP encoder script.

``convert_hf_to_gguf.py --mmproj`` reads LLaVA-layout checkpoints only with a Pixtral tower; for
CLIP + 2-layer MLP (llava-1.5) llama.cpp's documented route is ``convert_image_encoder_to_gguf.py``
given a CLIP vision folder and the projector weights (its "llava surgery" step). We do that step from
the merged checkpoint: the tower's tensors go to a ``CLIPVisionModel`` folder (``vision_model.*``
names, the tower's own config), the projector's to a ``llava.projector`` file, then the script runs
with ``--clip-model-is-vision`` and the processor's mean/std. That script was written against
transformers 4, whose ``CLIPVisionModel`` held the tower under ``.vision_model`` (it pops blocks from
``model.vision_model.encoder.layers`` and names tensors ``vision_model.*``); transformers 5's class
is the tower itself. So it runs through this module's ``__main__``, which hands it a thin wrapper
with that attribute in place of ``transformers.CLIPVisionModel`` (its text is not touched).

Feature layer: the checkpoint's ``vision_feature_layer`` is always passed in the tower config, so the
file states the block count and ``clip.vision.feature_layer`` (-2 of N blocks: N-1 blocks, no
post-layernorm, as transformers computes it). Left implicit, the script keeps N-1 blocks and llama.cpp
then runs one block fewer (measured on the zoo model: its image features equal transformers' after
N-2 blocks).

Known runtime defect, not in the file: llama.cpp's llava graph (0.3.36) appends the CLS embedding
after the patches while it still adds position embeddings and picks output rows as if CLS came first
(ggml-org/llama.cpp#25814). The file is laid out as transformers and the hub's LLaVA GGUFs are; the
runtime feeds the language model the projected CLS and drops the first patch. No weight layout
avoids that (the CLS slot's input carries no image content), so the export warns about it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlm.errors import VlmError
from vlm.export.gguf_toolchain import clip_encoder_script, converter_env

TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def check_llava_config(config: dict, where: Path) -> None:
    """What the CLIP path can express: CLS dropped (``default``), a GELU 2-layer MLP projector."""
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise VlmError(f"{where}: vision_feature_select_strategy={strategy!r}: llama.cpp's LLaVA projector "
                       "drops the CLS feature ('default') only")
    layers = config.get("vision_feature_layer", -2)
    n_blocks = config.get("vision_config", {}).get("num_hidden_layers", 0)
    depth = [v if v >= 0 else n_blocks + 1 + v for v in (layers if isinstance(layers, list) else [layers])]
    if depth != sorted(depth):
        raise VlmError(f"{where}: vision_feature_layer={layers}: llama.cpp concatenates several feature layers "
                       "in block order, transformers in the listed order; list them from shallow to deep")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise VlmError(f"{where}: projector_hidden_act={act!r}: llama.cpp's LLaVA MLP projector uses GELU")


def _split_tensors(model_dir: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    tower, projector = {}, {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise VlmError(f"{model_dir}: no *.safetensors weights to convert")
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key in st.keys():
                for p in TOWER_PREFIXES:
                    if key.startswith(p):
                        rest = key[len(p):]
                        tower[rest.removeprefix("vision_model.")] = st.get_tensor(key)
                for p in PROJECTOR_PREFIXES:
                    if key.startswith(p):
                        projector["multi_modal_projector." + key[len(p):]] = st.get_tensor(key).float()
    if not tower or not projector:
        raise VlmError(f"{model_dir}: no vision_tower / multi_modal_projector tensors found (is it a LLaVA checkpoint?)")
    return tower, projector


def write_clip_mmproj(model_dir: Path, out_file: Path, work: Path) -> Path:
    """Convert the tower + projector of the LLaVA checkpoint in ``model_dir`` to ``out_file`` (f16)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    check_llava_config(config, model_dir / "config.json")
    vision = dict(config["vision_config"], architectures=["CLIPVisionModel"], model_type="clip_vision_model")
    # Always written, also for LLaVA-1.5's -2: the script then stores the block count and
    # `clip.vision.feature_layer` explicitly. Without it the script keeps N-1 blocks and writes
    # block_count N-1, and llama.cpp's llava graph stops one block before its block count again
    # (it takes "the second-to-last layer" of what it was given): N-2 blocks run, not N-1.
    vision["vision_feature_layer"] = config.get("vision_feature_layer", -2)
    proc = json.loads((model_dir / "processor_config.json").read_text()).get("image_processor", {}) \
        if (model_dir / "processor_config.json").is_file() else \
        json.loads((model_dir / "preprocessor_config.json").read_text())
    clip_dir = work / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    tower, projector = _split_tensors(model_dir)
    save_file({k: v.contiguous() for k, v in tower.items()}, str(clip_dir / "model.safetensors"))
    (clip_dir / "config.json").write_text(json.dumps(vision, indent=2))
    torch.save(projector, clip_dir / "llava.projector")
    out_dir = work / "clip_out"
    cmd = [sys.executable, "-m", "vlm.export.gguf_clip", str(clip_encoder_script()), "-m", str(clip_dir), "--clip-model-is-vision",
           "--llava-projector", str(clip_dir / "llava.projector"), "--output-dir", str(out_dir),
           "--projector-type", "mlp",
           "--image-mean", *map(str, proc["image_mean"]), "--image-std", *map(str, proc["image_std"])]
    done = subprocess.run(cmd, env=converter_env(), capture_output=True, text=True)
    produced = out_dir / "mmproj-model-f16.gguf"
    if done.returncode != 0 or not produced.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise VlmError(f"llama.cpp's CLIP encoder script failed on {model_dir}:\n{tail}")
    produced.replace(out_file)
    return out_file


class _Transformers4CLIPVisionModel:
    """``CLIPVisionModel`` as transformers 4 laid it out: the tower under ``.vision_model``."""

    def __init__(self, tower):
        import torch

        self.vision_model = tower
        self._holder = torch.nn.Module()
        self._holder.vision_model = tower

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import CLIPVisionModel

        return cls(CLIPVisionModel.from_pretrained(path, **kwargs).eval())

    def state_dict(self):
        return self._holder.state_dict()


def _run_script(argv: list[str]) -> None:
    """``python -m vlm.export.gguf_clip SCRIPT ARGS...``: run llama.cpp's script with the wrapper."""
    import runpy

    import transformers

    transformers.CLIPVisionModel = _Transformers4CLIPVisionModel  # what the script imports by name
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    _run_script(sys.argv[1:])
