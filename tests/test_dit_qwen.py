"""Qwen-Image LoRAs in every dialect (diffusers, diffusion-pipe / ComfyUI `diffusion_model.`, musubi-tuner
`lora_unet_`, DiffSynth-Studio bare names with `.default`) merged into the diffusers folder and ComfyUI's single
file (with and without `model.diffusion_model.`) against diffusers' own fuse (QwenImagePipeline.lora_state_dict's
converters + load_lora_adapter + fuse_lora, fp32). Fixtures: fixtures/makers/dit_qwen.py."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError
from tests._dit_util import COMFY, F, folder_weights, max_diff, merged, single_file

FOLDER = F / "qwen-diffusers"


def _base() -> dict[str, torch.Tensor]:
    return folder_weights(FOLDER)


def _expected(lora: str) -> dict[str, torch.Tensor]:
    return {**_base(), **load_file(F / f"expect_qwen_{lora}.safetensors")}


@pytest.mark.parametrize("base", ["diffusers", "comfy", "bare"])
@pytest.mark.parametrize("lora", ["diffusers", "comfy", "musubi", "diffsynth"])
def test_qwen_merge_matches_diffusers(lora, base, tmp_path):
    path = FOLDER if base == "diffusers" else \
        single_file(_base(), tmp_path / "qwen-single.safetensors", COMFY if base == "comfy" else "")
    assert max_diff(merged(path, F / f"qwen_{lora}.safetensors", tmp_path), _expected(lora)) <= 1e-5


@pytest.mark.parametrize("src,to", [("musubi", "diffusers"), ("diffsynth", "kohya"), ("comfy", "diffusers")])
def test_qwen_convert_is_exact(src, to, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"qwen_{src}.safetensors"), to=to, out=out)
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    merge(FOLDER, [str(out)], tmp_path / "o")
    assert max_diff(folder_weights(tmp_path / "o"), _expected(src)) <= 1e-5


def test_qwen_is_told_from_flux_and_sd3(tmp_path):
    """All three name their attention transformer_blocks.N.attn.to_q in diffusers: Qwen's img_mod / img_mlp decide,
    and a Qwen LoRA on a Flux or SD3 base (or theirs on Qwen's) is one line naming both."""
    for lora, dialect in (("diffusers", "diffusers"), ("comfy", "comfy"), ("musubi", "kohya"),
                          ("diffsynth", "diffsynth")):
        d = inspect(F / f"qwen_{lora}.safetensors").report["family"]
        assert d["family"] == "qwen" and d["dialects"] == [dialect], d
    for lora, base, want in (("qwen_diffusers", F / "flux-diffusers", "Qwen-Image.*Flux.1"),
                             ("qwen_musubi", F / "sd3-diffusers", "Qwen-Image.*SD3"),
                             ("flux_diffusers", FOLDER, "Flux.1.*Qwen-Image"),
                             ("sd3_kohya", FOLDER, "SD3.*Qwen-Image")):
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], tmp_path / "o")
        assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
