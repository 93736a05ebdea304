"""Committed SD fixtures (fixtures/sd, made by fixtures/makers/sd.py with diffusers, PEFT and lycoris-lora)
against what those peers computed when the fixtures were made: diffusers' fused weights, and LyCORIS module
forward outputs y for recorded inputs x. Needs neither lycoris nor a network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _sd_util import apply_adapter
from loraport.checkpoint import Checkpoint
from loraport.formats import detect, load_adapter
from loraport.safetensors_io import SafetensorsFile

SD = Path(__file__).resolve().parent.parent / "fixtures" / "sd"
LYCORIS = sorted(p.stem[len("lycoris_"):] for p in SD.glob("lycoris_*.safetensors"))
pytestmark = pytest.mark.skipif(not (SD / "base").is_dir(), reason="fixtures/sd not generated")


@pytest.fixture(scope="module")
def base():
    return Checkpoint.open(SD / "base")


@pytest.fixture(scope="module")
def modules():
    """The micro pipeline's modules (for conv stride/padding), loaded by diffusers/transformers from the
    fixture folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(SD / "base" / "unet"),
            "text_encoder": CLIPTextModel.from_pretrained(SD / "base" / "text_encoder")}


@pytest.mark.parametrize("name,fmt", [("kohya_peft", "kohya"), ("diffusers_peft", "diffusers"),
                                      ("diffusers_legacy", "diffusers")])
def test_against_diffusers_fused(base, name, fmt):
    f = SD / f"{name}.safetensors"
    assert detect(f).name == fmt
    ad = load_adapter(f, base=base)
    merged = apply_adapter(ad, base)
    expect = SafetensorsFile(SD / f"expect_{name}.safetensors").load_all()
    assert set(merged) == set(expect)
    assert max((merged[k] - expect[k].float()).abs().max().item() for k in expect) <= 1e-5


@pytest.mark.parametrize("case", LYCORIS)
def test_lycoris_forward(base, modules, case):
    f = SD / f"lycoris_{case}.safetensors"
    assert detect(f).name in ("lycoris", "kohya")
    ad = load_adapter(f, base=base)
    merged = apply_adapter(ad, base)
    expect = SafetensorsFile(SD / f"expect_lycoris_{case}.safetensors").load_all()
    by_src = {}
    for d in ad.deltas:
        by_src.setdefault(d.source_key, d.target)
    names = sorted({k.rsplit(".", 1)[0] for k in expect})
    assert set(names) == set(by_src)
    worst = 0.0
    for n in names:
        x, y = expect[n + ".x"], expect[n + ".y"]
        tgt = by_src[n]
        comp, _, path = tgt.partition(".")
        mod = modules[comp].get_submodule(path.rsplit(".", 1)[0].removeprefix("text_model."))
        W = merged[tgt]
        bname = tgt[: -len(".weight")] + ".bias"
        b = merged.get(bname, base.get(bname).float() if bname in base else None)
        if isinstance(mod, torch.nn.Conv2d):
            got = F.conv2d(x, W, b, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            got = F.linear(x, W, b)
        worst = max(worst, ((got - y).abs().max() / y.abs().max().clamp_min(1e-6)).item())
    assert worst <= 2e-6, worst
