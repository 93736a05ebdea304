"""LTX-2 LoRAs (diffusers / LTX-2 trainer `transformer.`, ComfyUI `diffusion_model.` + Lightricks' names, on both
streams, both cross-attentions, the input projections and the timestep modulations) merged into the diffusers
folder and Lightricks' single file against diffusers' fuse (LTX2Pipeline.lora_state_dict — its non-diffusers
LTX-2 converter — + load_lora_adapter + fuse_lora, fp32), converted exactly, and told apart from LTX-Video, whose
names LTX-2's video stream shares. Fixtures: fixtures/makers/dit_ltx2.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError
from loraport.names import dit
from tests._dit_util import F, folder_weights, maker, max_diff, merged, onetrainer

LTX2 = {"diffusers": F / "ltx2-diffusers", "original": F / "ltx2-original.safetensors"}


def _base() -> dict[str, torch.Tensor]:
    return folder_weights(LTX2["diffusers"])


def _expected(lora: str, layout: str) -> dict[str, torch.Tensor]:
    want = {**_base(), **load_file(F / f"expect_ltx2_{lora}.safetensors")}
    return want if layout == "diffusers" else maker("dit_ltx2").ltx2_to_original(want)


@pytest.mark.parametrize("layout", list(LTX2))
@pytest.mark.parametrize("lora", ["diffusers", "comfy"])
def test_ltx2_merge_matches_diffusers(lora, layout, tmp_path):
    assert len(load_file(F / f"expect_ltx2_{lora}.safetensors")) >= 20, "the LoRA changes the model"
    assert max_diff(merged(LTX2[layout], F / f"ltx2_{lora}.safetensors", tmp_path), _expected(lora, layout)) <= 1e-5


def _respelled(how: str, dst):
    """The comfy file in another trainer's spelling: kohya's lora_unet_ (alpha = rank: scale 1) or DiffSynth's bare
    original names with PEFT's `.default`; OneTrainer's lora_transformer_ from the diffusers file."""
    if how == "onetrainer":
        return onetrainer(F / "ltx2_diffusers.safetensors", dst)
    out = {}
    for k, v in load_file(F / "ltx2_comfy.safetensors").items():
        mod, _, role = k.removeprefix("diffusion_model.").rpartition(".lora_")
        if how == "kohya":
            flat = "lora_unet_" + mod.replace(".", "_")
            out[f"{flat}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = v
            out[f"{flat}.alpha"] = torch.tensor(float(min(v.shape)))
        else:
            out[f"{mod}.lora_{role.removesuffix('.weight')}.default.weight"] = v
    save_file(out, dst)
    return dst


@pytest.mark.parametrize("layout", list(LTX2))
@pytest.mark.parametrize("how", ["kohya", "diffsynth", "onetrainer"])
def test_ltx2_other_spellings_merge_the_same(how, layout, tmp_path):
    src = _respelled(how, tmp_path / "s.safetensors")
    ref = "diffusers" if how == "onetrainer" else "comfy"
    assert inspect(src).report["family"]["family"] == "ltx2"
    assert max_diff(merged(LTX2[layout], src, tmp_path), _expected(ref, layout)) <= 1e-5


@pytest.mark.parametrize("src,to", [("comfy", "diffusers"), ("diffusers", "kohya")])
def test_ltx2_convert_is_exact(src, to, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"ltx2_{src}.safetensors"), to=to, out=out, read_options={"family": "ltx2"})
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    assert max_diff(merged(LTX2["diffusers"], out, tmp_path), _expected(src, "diffusers")) <= 1e-5


def test_ltx2_table_covers_every_linear_weight_of_both_layouts():
    table = dit.TABLES["ltx2"]
    dif = {k[:-7]: v.shape for k, v in _base().items() if k.endswith(".weight") and v.dim() == 2}
    orig = {k.removeprefix(maker("dit_ltx2").PREFIX)[:-7]: v.shape for k, v in load_file(LTX2["original"]).items()
            if k.endswith(".weight") and v.dim() == 2}
    for col, names, other in (("diffusers", dif, orig), ("original", orig, dif)):
        to = "original" if col == "diffusers" else "diffusers"
        for mod, shape in names.items():
            pieces = table.translate(mod, col, to, shape[1], shape[0])
            assert [p.module for p in pieces] and all(p.module in other for p in pieces), (col, mod, pieces)


def test_ltx2_is_told_apart_from_ltx_video(tmp_path):
    """LTX-2's video stream has LTX-Video's names: the anchors tell the bases apart (LTX-2 first), a LoRA with
    audio or cross-stream modules is LTX-2's, and each family's LoRA on the other's base is one line naming both."""
    assert dit.base_layout(folder_weights(LTX2["diffusers"])).family == "ltx2"
    assert dit.base_layout(load_file(LTX2["original"])).family == "ltx2"
    assert dit.base_layout(folder_weights(F / "ltx-diffusers")).family == "ltx_video"
    assert inspect(F / "ltx2_comfy.safetensors").report["family"]["family"] == "ltx2"
    assert inspect(F / "ltx2_diffusers.safetensors", base=LTX2["diffusers"]).report["family"]["family"] == "ltx2"
    for base, lora, want in ((F / "ltx-diffusers", "ltx2_comfy", "LTX-2.*LTX-Video"),
                             (LTX2["original"], "wan_comfy", "Wan.*LTX-2")):
        out = tmp_path / ("o" if base.is_dir() else "o.safetensors")
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], out)
        assert "\n" not in str(e.value) and not out.exists()
