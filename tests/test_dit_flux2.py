"""Flux.2 LoRAs (diffusers, kohya / musubi, ai-toolkit / ComfyUI dialects) merged into both base layouts (diffusers
folder, BFL single file) against what diffusers computes (Flux2Pipeline.lora_state_dict's converters +
load_lora_adapter + fuse_lora; for the final adaLN and shared modulations, which its LoRA converters drop or leave
unswapped, the original file + up@down through its single-file converter). Fixtures: fixtures/makers/dit_flux2.py."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from loraport.api import inspect, merge
from loraport.errors import BadInputError
from loraport.names import dit
from tests._dit_util import F, folder_weights, maker, max_diff, merged

BASES = {"diffusers": F / "flux2-diffusers", "original": F / "flux2-original.safetensors"}
LORAS = ("diffusers", "kohya", "comfy", "kohya_full")


def _base_sd() -> dict[str, torch.Tensor]:
    return folder_weights(BASES["diffusers"])


@pytest.mark.parametrize("layout", list(BASES))
@pytest.mark.parametrize("lora", LORAS)
def test_flux2_merge_matches_diffusers(lora, layout, tmp_path):
    want = {**_base_sd(), **load_file(F / f"expect_flux2_{lora}.safetensors")}
    assert sum(not torch.equal(want[k], v) for k, v in _base_sd().items()) >= 4, "the LoRA changes the model"
    if layout != "diffusers":
        want = maker("dit_flux2").to_original(want)
    assert max_diff(merged(BASES[layout], F / f"flux2_{lora}.safetensors", tmp_path), want) <= 1e-5


@pytest.mark.parametrize("layout", list(BASES))
@pytest.mark.parametrize("lokr, changed", [("aitk_lokr", 9), ("lycoris_lokr", 5)])
def test_flux2_lokr_matches_diffusers(lokr, changed, layout, tmp_path):
    """Flux.2 LoKr as ai-toolkit writes it (BFL names, Kronecker factors on the fused qkv, an MLP, linear1 and a
    rank-decomposed linear2 with alpha/rank; diffusers fuses the model's projections and applies PEFT's LoKr to
    them) and as LyCORIS's wrapper writes it (lycoris_<diffusers path>): diffusers' weights within 1e-5 in both base
    layouts (into the diffusers folder a fused qkv delta's rows land on q, k and v)."""
    want = {**_base_sd(), **load_file(F / f"expect_flux2_{lokr}.safetensors")}
    assert sum(not torch.equal(want[k], v) for k, v in _base_sd().items()) == changed, "the LoKr changes the model"
    if layout != "diffusers":
        want = maker("dit_flux2").to_original(want)
    assert max_diff(merged(BASES[layout], F / f"flux2_{lokr}.safetensors", tmp_path), want) <= 1e-5


def test_flux2_table_covers_every_linear_weight_of_both_layouts():
    table = dit.TABLES["flux2"]
    dif = {k[:-7]: v.shape for k, v in _base_sd().items() if k.endswith(".weight") and v.dim() == 2}
    orig = {k[:-7]: v.shape for k, v in load_file(BASES["original"]).items() if k.endswith(".weight") and v.dim() == 2}
    for col, names, other in (("diffusers", dif, orig), ("original", orig, dif)):
        to = "original" if col == "diffusers" else "diffusers"
        for mod, shape in names.items():
            pieces = table.translate(mod, col, to, shape[1], shape[0])
            assert pieces, f"{mod} ({col}) is in no row"
            assert sum((p.lora_rows[1] - p.lora_rows[0]) if p.lora_rows else shape[0] for p in pieces) == shape[0]
            for p in pieces:
                assert p.module in other, f"{mod} -> {p.module}"


def test_flux2_is_told_apart_from_flux1(tmp_path):
    """Flux.2's original file also has single_blocks.0.linear1: the anchors tell the bases apart, the base decides
    a LoRA on modules both families share, and a Flux.2 LoRA on a Flux.1 base is one line naming both."""
    assert dit.base_layout(load_file(BASES["original"])).family == "flux2"
    assert dit.base_layout(load_file(F / "flux-bfl.safetensors")).family == "flux"
    assert inspect(F / "flux2_kohya.safetensors", base=BASES["original"]).report["family"]["family"] == "flux2"
    assert inspect(F / "flux2_comfy.safetensors").report["family"]["family"] == "flux2"
    with pytest.raises(BadInputError, match="Flux.2.*Flux.1") as e:
        merge(F / "flux-diffusers", [str(F / "flux2_comfy.safetensors")], tmp_path / "o")
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_a_lora_on_shared_modules_needs_the_base_to_change_column(tmp_path):
    """A kohya Flux.2 LoRA on qkv / proj / mlp / linear1 / linear2 only is also a Flux.1 one by its names: inspect
    says both, converting it to diffusers names without a base (Flux.1 and Flux.2 name linear1 and the MLPs
    differently) is refused in one line, with the base it is exact, and kohya → kohya needs no base."""
    from loraport.api import convert

    rep = inspect(F / "flux2_kohya.safetensors").report
    assert rep["family"]["also_fits"] == ["flux2"] and any("Flux.2" in n for n in rep["notes"])
    with pytest.raises(BadInputError, match="Flux.1.*or Flux.2.*pass (--)?base") as e:
        convert(str(F / "flux2_kohya.safetensors"), to="diffusers", out=tmp_path / "c.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "c.safetensors").exists()
    out = tmp_path / "c2.safetensors"
    rep = convert(str(F / "flux2_kohya.safetensors"), to="diffusers", out=out, base=BASES["original"])
    assert rep.report["max_abs_diff"] == 0
    merge(BASES["diffusers"], [str(out)], tmp_path / "o")
    want = {**_base_sd(), **load_file(F / "expect_flux2_kohya.safetensors")}
    assert max_diff(folder_weights(tmp_path / "o"), want) <= 1e-5
    assert convert(str(F / "flux2_kohya.safetensors"), to="kohya", out=tmp_path / "k.safetensors").report[
        "max_abs_diff"] == 0


@pytest.mark.parametrize("src,to,base", [("diffusers", "kohya", None), ("comfy", "diffusers", "original"),
                                         ("kohya_full", "diffusers", "diffusers")])
def test_flux2_convert_is_exact(src, to, base, tmp_path):
    """Written in another dialect (qkv regrouped or split, the final adaLN halves swapped) and read back exactly;
    the converted file merges to what diffusers made of the original."""
    from loraport.api import convert

    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"flux2_{src}.safetensors"), to=to, out=out, base=None if base is None else BASES[base])
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    merge(BASES["diffusers"], [str(out)], tmp_path / "o")
    want = {**_base_sd(), **load_file(F / f"expect_flux2_{src}.safetensors")}
    assert max_diff(folder_weights(tmp_path / "o"), want) <= 1e-5
