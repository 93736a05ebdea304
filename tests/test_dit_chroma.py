"""Chroma LoRAs in every dialect (diffusers / ai-toolkit `transformer.`, sd-scripts `lora_unet_` original names,
OneTrainer `lora_transformer_`, diffusion-pipe / ComfyUI `diffusion_model.`) merged into both base layouts
(diffusers folder, original single file with and without ComfyUI's `model.diffusion_model.` prefix) against what
diffusers computes (ChromaPipeline.lora_state_dict + load_lora_adapter + fuse_lora in fp32, or the original +
alpha/r·B@A through diffusers' Chroma single-file converter), converted exactly; and Flux.1 LoRAs on a Chroma base:
merged where the modules are Flux's own (attention, MLP, linear1/2), refused in one line where they are the
modulation Chroma has pruned. Fixtures: fixtures/makers/dit_chroma.py."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import convert, inspect, merge
from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError
from loraport.formats import load_adapter
from tests._dit_util import F, assert_table_covers, folder_weights, maker, max_diff, merged, onetrainer, single_file

CHROMA = {"diffusers": F / "chroma-diffusers", "original": F / "chroma-original.safetensors"}


def _maker():
    return maker("dit_chroma")


@cache
def _base() -> dict[str, torch.Tensor]:  # read-only: callers build new dicts
    return folder_weights(CHROMA["diffusers"])


def _expected(lora: str, layout: str) -> dict[str, torch.Tensor]:
    want = {**_base(), **load_file(F / f"expect_chroma_{lora}.safetensors")}
    return want if layout == "diffusers" else _maker().to_chroma_original(want)


# each dialect into both layouts (the prefixed original once: the prefix is the layer's, not the family's)
MERGES = [("diffusers", "diffusers"), ("diffusers", "original"), ("kohya", "diffusers"), ("kohya", "original"),
          ("comfy", "diffusers"), ("comfy", "comfy-original"), ("onetrainer", "original")]


@pytest.mark.parametrize("lora,base", MERGES)
def test_chroma_merge_matches_diffusers(lora, base, tmp_path):
    src = onetrainer(F / "chroma_diffusers.safetensors", tmp_path / "ot.safetensors") if lora == "onetrainer" \
        else F / f"chroma_{lora}.safetensors"
    path = CHROMA["diffusers" if base == "diffusers" else "original"]
    if base == "comfy-original":
        path = single_file(CHROMA["original"], tmp_path / "base.safetensors")
    ref = "diffusers" if lora == "onetrainer" else lora
    changed, base_sd = load_file(F / f"expect_chroma_{ref}.safetensors"), _base()
    assert sum(not torch.equal(v, base_sd[k]) for k, v in changed.items()) >= 10, "the LoRA changes the model"
    want = _expected(ref, "diffusers" if base == "diffusers" else "original")
    assert max_diff(merged(path, src, tmp_path), want) <= 1e-5


@pytest.mark.parametrize("src,to,base", [("kohya", "diffusers", None), ("comfy", "kohya", None),
                                         ("comfy", "diffusers", "original"),
                                         ("diffusers", "kohya", "diffusers")])
def test_chroma_convert_is_exact(src, to, base, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"chroma_{src}.safetensors"), to=to, out=out, base=None if base is None else CHROMA[base])
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    keys = list(load_file(out))
    assert all(k.startswith("lora_unet_" if to == "kohya" else "transformer.") for k in keys)
    assert any("distilled_guidance_layer" in k for k in keys) == (src != "kohya")
    assert max_diff(merged(CHROMA["original"], out, tmp_path), _expected(src, "original")) <= 1e-5


def test_chroma_table_covers_every_linear_weight_of_both_layouts():
    assert_table_covers("chroma", CHROMA["diffusers"], CHROMA["original"])


def test_chroma_is_named_and_its_base_told_from_flux():
    for lora, dialect in (("diffusers", "diffusers"), ("comfy", "comfy")):
        d = inspect(F / f"chroma_{lora}.safetensors").report["family"]
        assert d["family"] == "chroma" and d["dialects"] == [dialect], d
    for base, layout in (("original", "original"), ("diffusers", "diffusers")):
        d = inspect(F / "chroma_kohya.safetensors", base=CHROMA[base]).report["family"]
        assert d == {**d, "family": "chroma", "dialects": ["kohya"], "base_layout": layout}, d
    for base, layout in (("flux-bfl.safetensors", "original"), ("flux-diffusers", "diffusers")):
        d = inspect(F / "chroma_kohya.safetensors", base=F / base).report["family"]
        assert d["family"] == "flux" and d["base_layout"] == layout, d  # Flux's own modules on a Flux base


def _flux_shared(dst: Path) -> Path:
    """sd-scripts' Flux LoRA less its modulation modules (img_mod / txt_mod / modulation.lin): only modules a
    Chroma model has too. The micro Chroma is the micro Flux's width, as Chroma is Flux-schnell's."""
    save_file({k: v for k, v in load_file(F / "flux_kohya.safetensors").items()
               if "_mod_lin" not in k and "_modulation_lin" not in k}, dst)
    return dst


def test_flux_lora_on_its_shared_modules_merges_into_chroma(tmp_path):
    """Reference: sd-scripts' own rule (W + alpha/r·up@down) on the Chroma original; the folder's merge is
    compared through the maker's diffusers→original inverse (checked against diffusers' converter)."""
    mk = _maker()
    lora = _flux_shared(tmp_path / "flux_shared.safetensors")
    flux_lora = load_file(lora)
    want = mk.apply_kohya_to_bfl(load_file(CHROMA["original"]), flux_lora)
    assert max_diff(merged(CHROMA["original"], lora, tmp_path), want) <= 1e-5
    (tmp_path / "d").mkdir()
    assert max_diff(mk.to_chroma_original(merged(CHROMA["diffusers"], lora, tmp_path / "d")), want) <= 1e-5


def test_flux_modulation_lora_on_chroma_and_chroma_guidance_lora_on_flux_are_one_line(tmp_path):
    for lora, base, want in (("flux_kohya", CHROMA["original"], r"Flux.1.*Chroma: 3 of its 14 modules \(e.g. "
                              r"lora_unet_double_blocks_1_img_mod_lin\) are not in a Chroma model; pass a Flux.1"),
                             ("flux_diffusers", CHROMA["diffusers"], r"Flux.1.*Chroma: .*norm.*not in a Chroma"),
                             ("chroma_comfy", F / "flux-bfl.safetensors", r"Chroma.*Flux.1.*distilled_guidance"),
                             ("chroma_diffusers", F / "flux-diffusers", r"Chroma.*Flux.1.*distilled_guidance")):
        out = tmp_path / ("o" if base.is_dir() else "o.safetensors")
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], out)
        assert "\n" not in str(e.value) and not out.exists()
        assert e.value.flag_hint[0] == "--no-strict"  # the way to merge what the base has
    # Qwen-Image's transformer_blocks.N.attn.to_q is not Flux's, though spelled alike: no kin, no way round
    with pytest.raises(BadInputError, match=r"Qwen-Image.*Flux.1 \(dev, schnell, Kontext\); pass") as e:
        merge(F / "flux-diffusers", [str(F / "qwen_diffusers.safetensors")], tmp_path / "o", strict=False)
    assert e.value.flag_hint is None and not (tmp_path / "o").exists()


@pytest.mark.parametrize("lora", ["kohya", "xlabs", "diffusers"])
def test_flux_lora_on_chroma_no_strict_merges_what_chroma_has(lora, tmp_path):
    """--no-strict: a Flux LoRA that also trains modulation merges its attention / MLP / linear1-2 modules into a
    Chroma base and skips (and notes) the rest, as ComfyUI does. Reference: diffusers' own fuse of that Flux LoRA
    (expect_flux_* - the Flux base: ΔW per tensor; the micro Chroma has the micro Flux's shapes) on the tensors a
    Chroma model has; XLabs' attention-only LoRA needs no --no-strict at all."""
    flux_base = folder_weights(F / "flux-diffusers")
    delta = {k: v - flux_base[k] for k, v in load_file(F / f"expect_flux_{lora}.safetensors").items()}
    want = {k: v + delta[k] if k in delta else v for k, v in _base().items()}
    skipped = sorted(set(delta) - set(want))
    assert (lora == "xlabs") == (not skipped) and all("norm" in k or "time_text_embed" in k for k in skipped)
    out = tmp_path / "o"
    merge(CHROMA["diffusers"], [str(F / f"flux_{lora}.safetensors")], out, strict=lora == "xlabs")
    assert max_diff(folder_weights(out), want) <= 1e-5
    ad = load_adapter(F / f"flux_{lora}.safetensors", base=Checkpoint.open(CHROMA["diffusers"]), strict=False)
    assert ad.family["family"] == "chroma" and bool(ad.metadata.get("skipped")) == (lora != "xlabs"), ad.metadata


@pytest.mark.slow  # imports diffusers (~10 s): pytest -m slow tests/test_dit_chroma.py
def test_converted_chroma_files_load_in_diffusers(tmp_path):
    """What loraport writes is what diffusers reads: the comfy file (which diffusers cannot load for Chroma)
    converted to the diffusers dialect fuses, in diffusers, to the comfy reference."""
    from diffusers import ChromaPipeline

    from tests._dit_util import diffusers_fuse

    out = tmp_path / "c.safetensors"
    convert(str(F / "chroma_comfy.safetensors"), to="diffusers", out=out)
    got = diffusers_fuse(_maker().micro_chroma, _base(), ChromaPipeline, out)
    assert max_diff(got, _expected("comfy", "diffusers")) <= 1e-5
