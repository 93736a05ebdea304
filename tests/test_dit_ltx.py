"""LTX-Video LoRAs in every dialect (diffusers / LTX-Video-Trainer `transformer.`, diffusion-pipe / ComfyUI
`diffusion_model.`, the kohya `lora_unet_` spelling ComfyUI also loads) merged into the diffusers folder and
Lightricks' single file (model.diffusion_model. names with the VAE beside them, or bare) against diffusers' fuse
(LTXPipeline.lora_state_dict + load_lora_adapter + fuse_lora, fp32; for patchify_proj / adaln_single, which
diffusers' LoRA converter does not rename, the original file + up@down through its single-file converter), and
converted exactly. Fixtures: fixtures/makers/dit_ltx.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError
from tests._dit_util import F, folder_weights, maker, max_diff

LTX = {"diffusers": F / "ltx-diffusers", "original": F / "ltx-original.safetensors"}


def _base() -> dict[str, torch.Tensor]:
    return folder_weights(LTX["diffusers"])


def _expected(lora: str) -> dict[str, torch.Tensor]:
    """diffusers' result in diffusers names; the kohya and DiffSynth files are comfy + comfy_full respelled."""
    parts = ("comfy", "comfy_full") if lora in ("kohya", "diffsynth") else (lora,)
    want = _base()
    for p in parts:
        want.update(load_file(F / f"expect_ltx_{p}.safetensors"))
    return want


def _kohya(dst: Path) -> Path:
    """ComfyUI's lora_unet_ spelling of the comfy files (its key map flattens every diffusion_model. module),
    lora_down / lora_up with alpha = rank: the same scale 1."""
    out = {}
    for name in ("comfy", "comfy_full"):
        for k, v in load_file(F / f"ltx_{name}.safetensors").items():
            mod, _, role = k.removeprefix("diffusion_model.").rpartition(".lora_")
            flat = "lora_unet_" + mod.replace(".", "_")
            out[f"{flat}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = v
            out[f"{flat}.alpha"] = torch.tensor(float(v.shape[0] if role.startswith("A") else v.shape[1]))
    save_file(out, dst)
    return dst


def _diffsynth(dst: Path) -> Path:
    """DiffSynth-Studio's spelling of the comfy files: bare original names, PEFT's `.default` adapter name."""
    out = {}
    for name in ("comfy", "comfy_full"):
        for k, v in load_file(F / f"ltx_{name}.safetensors").items():
            mod, _, role = k.removeprefix("diffusion_model.").rpartition(".lora_")
            out[f"{mod}.lora_{role.removesuffix('.weight')}.default.weight"] = v
    save_file(out, dst)
    return dst


@pytest.mark.parametrize("base", ["diffusers", "original", "bare-original"])
@pytest.mark.parametrize("lora", ["diffusers", "comfy", "comfy_full", "kohya", "diffsynth"])
def test_ltx_merge_matches_diffusers(lora, base, tmp_path):
    made = {"kohya": _kohya, "diffsynth": _diffsynth}
    src = made[lora](tmp_path / "k.safetensors") if lora in made else F / f"ltx_{lora}.safetensors"
    mk = maker("dit_ltx")
    if base == "bare-original":  # the transformer alone, no prefix
        path = tmp_path / "bare.safetensors"
        save_file({k.removeprefix(mk.PREFIX): v for k, v in load_file(LTX["original"]).items()
                   if k.startswith(mk.PREFIX)}, path)
    else:
        path = LTX[base]
    out = tmp_path / ("o" if base == "diffusers" else "o.safetensors")
    merge(path, [str(src)], out)
    want = _expected(lora)
    if base == "diffusers":
        assert max_diff(folder_weights(out), want) <= 1e-5
        return
    want = mk.ltx_to_original(want)
    if base == "original":  # the prefix kept, the VAE's tensors carried over untouched
        want = {**{mk.PREFIX + k: v for k, v in want.items()}, **mk.VAE}
    assert max_diff(load_file(out), want) <= 1e-5


@pytest.mark.parametrize("src,to", [("comfy_full", "diffusers"), ("diffusers", "kohya"), ("comfy", "diffusers")])
def test_ltx_convert_is_exact(src, to, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"ltx_{src}.safetensors"), to=to, out=out)
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    if src == "comfy_full" and to == "diffusers":
        assert any(k.startswith("transformer.proj_in.") for k in load_file(out))  # patchify_proj, renamed
    merge(LTX["diffusers"], [str(out)], tmp_path / "o")
    got = folder_weights(tmp_path / "o")
    assert max_diff(got, _expected(src)) <= 1e-5


def test_ltx_is_named_and_other_families_refused(tmp_path):
    made = {"kohya": _kohya, "diffsynth": _diffsynth}
    for lora, dialect in (("diffusers", "diffusers"), ("comfy", "comfy"), ("comfy_full", "comfy"),
                          ("kohya", "kohya"), ("diffsynth", "diffsynth")):
        src = made[lora](tmp_path / f"{lora}.safetensors") if lora in made else F / f"ltx_{lora}.safetensors"
        d = inspect(src).report["family"]
        assert d["family"] == "ltx_video" and d["dialects"] == [dialect], d
    for base, lora, want in ((F / "wan-diffusers", "ltx_comfy", "LTX-Video.*Wan"),
                             (F / "hunyuan-original.safetensors", "ltx_diffusers", "LTX-Video.*HunyuanVideo"),
                             (LTX["original"], "wan_comfy", "Wan.*LTX-Video"),
                             (LTX["diffusers"], "qwen_musubi", "Qwen-Image.*LTX-Video")):
        out = tmp_path / ("o" if base.is_dir() else "o.safetensors")
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], out)
        assert "\n" not in str(e.value) and not out.exists()
