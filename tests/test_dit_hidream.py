"""HiDream-I1 LoRAs in every dialect (diffusers / ai-toolkit `transformer.`, diffusion-pipe / ComfyUI
`diffusion_model.`, `lora_unet_`) merged into the diffusers folder and the single file (with and without
`model.diffusion_model.`) against diffusers' own fuse (HiDreamImagePipeline.lora_state_dict's converter +
load_lora_adapter + fuse_lora, fp32), mixture-of-experts MLPs included, and converted exactly.
Fixtures: fixtures/makers/dit_hidream.py."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from safetensors.torch import load_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError
from tests._dit_util import COMFY, F, folder_weights, max_diff, merged, single_file

FOLDER = F / "hidream-diffusers"


@cache
def _base() -> dict[str, torch.Tensor]:  # read-only: callers build new dicts
    return folder_weights(FOLDER)


def _expected(lora: str) -> dict[str, torch.Tensor]:
    return {**_base(), **load_file(F / f"expect_hidream_{'comfy' if lora == 'kohya' else lora}.safetensors")}


@pytest.mark.parametrize("lora,base", [("diffusers", "diffusers"), ("diffusers", "comfy"), ("comfy", "diffusers"),
                                       ("comfy", "bare"), ("kohya", "diffusers")])
def test_hidream_merge_matches_diffusers(lora, base, tmp_path):
    path = FOLDER if base == "diffusers" else \
        single_file(_base(), tmp_path / "hidream-single.safetensors", COMFY if base == "comfy" else "")
    want = _expected(lora)
    assert sum("experts" in k and not torch.equal(v, _base()[k]) for k, v in want.items()) >= 2, "experts changed"
    assert max_diff(merged(path, F / f"hidream_{lora}.safetensors", tmp_path), want) <= 1e-5


@pytest.mark.parametrize("src,to", [("comfy", "diffusers"), ("diffusers", "kohya")])
def test_hidream_convert_is_exact(src, to, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"hidream_{src}.safetensors"), to=to, out=out)
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    assert all(k.startswith("lora_unet_" if to == "kohya" else "transformer.") for k in load_file(out))
    assert max_diff(merged(FOLDER, out, tmp_path), _expected(src)) <= 1e-5


def test_hidream_table_covers_every_linear_weight():
    """Every 2-D weight but the MoE gates (bare parameters, not linear layers) is a row; the names are the same in
    both layouts."""
    from loraport.names import dit

    table = dit.TABLES["hidream"]
    for name, t in _base().items():
        mod = name[:-len(".weight")]
        if name.endswith(".weight") and t.dim() == 2 and not mod.endswith(".ff_i.gate"):
            assert table.translate(mod, "diffusers", "original", t.shape[1], t.shape[0]) == [dit.Piece(mod, None, None)]


def test_hidream_is_named_and_other_families_refused(tmp_path):
    for lora, dialect in (("diffusers", "diffusers"), ("comfy", "comfy"), ("kohya", "kohya")):
        d = inspect(F / f"hidream_{lora}.safetensors").report["family"]
        assert d["family"] == "hidream" and d["dialects"] == [dialect], d
    for lora, base, want in (("hidream_comfy", F / "qwen-diffusers", "HiDream.*Qwen-Image"),
                             ("qwen_diffusers", FOLDER, "Qwen-Image.*HiDream")):
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], tmp_path / "o")
        assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


@pytest.mark.slow  # imports diffusers (~10 s): pytest -m slow tests/test_dit_hidream.py
def test_converted_hidream_files_load_in_diffusers(tmp_path):
    """What loraport writes is what diffusers reads: the kohya file (no diffusers loader) converted to the
    diffusers dialect fuses in diffusers to the comfy file's reference (the same ΔW)."""
    from diffusers import HiDreamImagePipeline

    from tests._dit_util import diffusers_fuse, maker

    out = tmp_path / "c.safetensors"
    convert(str(F / "hidream_kohya.safetensors"), to="diffusers", out=out)
    got = diffusers_fuse(maker("dit_hidream").micro_hidream, _base(), HiDreamImagePipeline, out)
    assert max_diff(got, _expected("kohya")) <= 1e-5
