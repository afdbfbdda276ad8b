"""Saved checkpoints carry the hub's tensor names (``Family.hub_layout``, ``vlm.checkpoint_layout``).

transformers 5 saves LLaVA's CLIP and Gemma 3's SigLIP tower as ``vision_tower.embeddings/encoder.*``;
the hub's checkpoints (and so vLLM, which loads nothing else) have ``vision_tower.vision_model.*``.
For every zoo variant: the merged export (``vlm export --merged``) and the zoo's own checkpoint are
transformers' files renamed by the family's rules only (byte for byte transformers' files where the
family has none), load in plain transformers with no missing or unexpected weight, and compute what
base + adapter computes. The served half (vLLM loading these files) is in
tests/vlm/serve/test_serve_families.py.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import ZOO_VARIANTS
from vlm.checkpoint_layout import read_header, rename_safetensors, save_model, to_hub_layout
from vlm.errors import VlmError
from vlm.families import family_for_config

# The hub's layout of a nested CLIP/SigLIP tower (llava-hf/llava-1.5-7b-hf, google/gemma-3-4b-it):
# every tower tensor sits under vision_tower.vision_model (vLLM's module names too).
HUB_TOWER = "vision_tower.vision_model."


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _native_save(checkpoint, out):
    """The checkpoint's weights as transformers 5 itself writes them for a model it built (no
    conversion recorded from loading: the layout our merged exports had before)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    fresh = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(checkpoint), dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    return out


def _transformers_hub_names(checkpoint) -> list[str]:
    """The names transformers' own checkpoint conversion mapping says the original (hub) checkpoint
    has: its load-time renamings reversed in full, the tower prefix changes included (a model it
    built itself is saved without those: the names our exports had before). The oracle, independent
    of the family records."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(checkpoint))
    model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)   # as save_pretrained does
    return sorted(revert_weight_conversion(model, state))


@pytest.mark.parametrize("variant", ZOO_VARIANTS)
def test_zoo_checkpoint_is_transformers_files_renamed_to_the_hub_names(tiny_checkpoint, variant, tmp_path):
    from transformers import AutoConfig

    zoo = tiny_checkpoint(variant)
    family = family_for_config(AutoConfig.from_pretrained(zoo))
    native = _native_save(zoo, tmp_path / "native")
    ours, theirs = _tensors(zoo), _tensors(native)
    assert sorted(ours) == _transformers_hub_names(zoo)
    assert sorted(ours) == sorted(family.hub_key(k) for k in theirs)
    assert all(torch.equal(ours[family.hub_key(k)], t) for k, t in theirs.items())
    if sorted(ours) == sorted(theirs):   # no renaming: transformers' file, byte for byte
        assert (zoo / "model.safetensors").read_bytes() == (native / "model.safetensors").read_bytes()


def _adapter(base, out, family):
    """A PEFT adapter on every language projection and (where the family has one) every vision
    linear, with B drawn at random so the merge changes the tower's and decoder's weights."""
    from vlm.load import load
    from vlm.lora import apply_lora

    torch.manual_seed(0)
    model, processor = load(base, dtype="fp32", device="cpu")
    pm = apply_lora(model, family, r=4, alpha=8, targets=["language.attention", "language.mlp", "vision"],
                    warn=False)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "vlmtune.json").write_text(json.dumps({"vlmtune": {"base_model": str(base), "family": family.name}}))
    return out


def _base(tiny_checkpoint, variant, layout, folder):
    """The zoo checkpoint as the hub lays it out, or as transformers 5 writes a model it built (a
    checkpoint a user saved with plain ``save_pretrained``)."""
    import shutil

    zoo = tiny_checkpoint(variant)
    if layout == "hub":
        return zoo
    _native_save(zoo, folder)
    for f in zoo.iterdir():
        if f.is_file() and not f.name.startswith("model") and not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.parametrize("layout", ["hub", "transformers"])
@pytest.mark.parametrize("variant", ZOO_VARIANTS)
def test_merged_export_has_hub_names_and_loads_with_every_weight(tiny_checkpoint, variant, layout, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlm.export.merge import export_merged
    from vlm.export.verify import compare_merged

    base = _base(tiny_checkpoint, variant, layout, tmp_path / "base")
    family = family_for_config(AutoConfig.from_pretrained(base))
    adapter = _adapter(base, tmp_path / "adapter", family)
    merged = export_merged(adapter, tmp_path / "merged", dtype="fp32")
    names = sorted(_tensors(merged))
    native = sorted(_tensors(_native_save(merged, tmp_path / "native")))
    assert names == _transformers_hub_names(merged)              # the hub's names ...
    assert names == sorted(family.hub_key(k) for k in native)   # ... = transformers', renamed by the family only
    assert names == sorted(_tensors(tiny_checkpoint(variant)))   # the zoo's layout, whatever the base's
    model, info = AutoModelForImageTextToText.from_pretrained(merged, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    result = compare_merged(adapter, merged)   # base + adapter (PEFT) vs the merged folder, same probe
    assert result["ok"] and result["relative"] < 1e-5, result


def test_sharded_checkpoint_renames_every_shard_and_the_index(tiny_checkpoint, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    variant = next(v for v in ZOO_VARIANTS
                   if family_for_config(AutoConfig.from_pretrained(tiny_checkpoint(v))).hub_layout)
    model = AutoModelForImageTextToText.from_pretrained(_native_save(tiny_checkpoint(variant), tmp_path / "n"))
    out = save_model(model, tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(_tensors(out))
    assert all(k in read_header(out / f)[0] for k, f in index.items())   # each name in its shard
    assert any(k.startswith(HUB_TOWER) for k in index) and not any(
        k.startswith("vision_tower.") and not k.startswith(HUB_TOWER) for k in index)
    again, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_rename_rewrites_only_the_header(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"vision_tower.encoder.w": torch.randn(3, 5), "vision_tower.vision_model.x": torch.arange(7),
               "language_model.model.y": torch.randn(2, dtype=torch.bfloat16)}
    save_file(tensors, str(path), metadata={"format": "pt", "note": "kept"})
    before = path.read_bytes()
    _, start = read_header(path)
    hub = "vision_tower.vision_model."

    def rename(k):
        return hub + k[len("vision_tower."):] if k.startswith("vision_tower.") and not k.startswith(hub) else k

    assert rename_safetensors(path, rename) == 1
    after = path.read_bytes()
    header, new_start = read_header(path)
    assert new_start % 8 == 0 and after[new_start:] == before[start:]        # weights byte for byte
    assert header["__metadata__"] == {"format": "pt", "note": "kept"}
    with safe_open(str(path), "pt") as h:
        assert sorted(h.keys()) == sorted(rename(k) for k in tensors)
        assert all(torch.equal(h.get_tensor(rename(k)), t) for k, t in tensors.items())
    assert rename_safetensors(path, rename) == 0 and path.read_bytes() == after   # idempotent, untouched


def test_rename_refuses_collisions_and_broken_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a.x": torch.zeros(1), "b.x": torch.ones(1)}, str(path))
    before = path.read_bytes()
    with pytest.raises(VlmError, match="collides"):
        rename_safetensors(path, lambda k: "c.x")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]   # nothing half-written
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(VlmError, match="bad.safetensors.*header length"):
        rename_safetensors(bad, str)
    bad.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(VlmError, match="bad.safetensors.*unreadable safetensors header"):
        rename_safetensors(bad, str)


def test_hub_layout_is_idempotent(tiny_checkpoint):
    from transformers import AutoConfig

    for variant in ZOO_VARIANTS:
        path = tiny_checkpoint(variant)
        family = family_for_config(AutoConfig.from_pretrained(path))
        stamp = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in path.glob("*.safetensors")}
        assert to_hub_layout(path, family) == 0    # the zoo's files are already in the hub's names
        assert stamp == {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in path.glob("*.safetensors")}


@pytest.mark.parametrize("variant", ZOO_VARIANTS)
def test_vllm_names_of_the_tower_are_the_hub_names(tiny_checkpoint, variant):
    """vLLM's module names of a nested tower are the hub checkpoint's (its mapper leaves
    ``vision_tower.vision_model.*`` as is): the names ``vlm.quant.vllm_names`` gives vLLM for layers
    kept in 16 bit (bitsandbytes skip list) must be those, not transformers 5's flattened ones."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlm.quant.vllm_names import vllm_skip_names

    zoo = tiny_checkpoint(variant)
    family = family_for_config(AutoConfig.from_pretrained(zoo))
    if not family.hub_layout or family.vllm is None:
        pytest.skip(f"{family.name}: transformers 5 writes the hub's names (no hub_layout rule)")
    model = AutoModelForImageTextToText.from_pretrained(zoo)
    fused = {leaf for group, _ in family.vllm.fused_linears for leaf in group}
    tower = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and family.component_of(n) == "vision" and n.rsplit(".", 1)[-1] not in fused]
    names, _ = vllm_skip_names(family, tower)
    assert len(names) == len(tower) > 0
    hub = set(_tensors(zoo))
    assert [n for n in names if n + ".weight" not in hub] == []
