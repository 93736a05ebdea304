"""Wan 2.1 / 2.2 LoRAs in every dialect (diffusers, diffusion-pipe / ComfyUI `diffusion_model.`, musubi-tuner
`lora_unet_`, DiffSynth-Studio bare names with `.default`) merged into both base layouts (diffusers folder,
Wan-AI's original single file, with and without ComfyUI's `model.diffusion_model.` prefix) against what diffusers
computes (its own Wan LoRA converters + load_lora_adapter + fuse_lora in fp32), and converted exactly.
Fixtures: fixtures/makers/dit_wan.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError
from loraport.names import dit
from tests._dit_util import F, folder_weights, maker, max_diff, merged, single_file

WAN = {"diffusers": F / "wan-diffusers", "original": F / "wan-original.safetensors"}


def _base() -> dict[str, torch.Tensor]:
    return folder_weights(WAN["diffusers"])


def _expected(lora: str, layout: str) -> dict[str, torch.Tensor]:
    want = {**_base(), **load_file(F / f"expect_wan_{lora}.safetensors")}
    return want if layout == "diffusers" else maker("dit_wan").wan_to_original(want)


def _diffsynth(dst: Path) -> Path:
    """The comfy file as DiffSynth-Studio saves it: bare original names, PEFT's `.default` adapter name, no
    alpha (each module's alpha/r folded into B), so diffusers' fuse of the comfy file is its reference too."""
    src = load_file(F / "wan_comfy.safetensors")
    out = {}
    for k, v in src.items():
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k[:-len(".lora_A.weight")]
        alpha = src.get(mod + ".alpha")
        scale = 1.0 if alpha is None else float(alpha) / v.shape[0]
        bare = mod[len("diffusion_model."):]
        out[f"{bare}.lora_A.default.weight"] = v
        out[f"{bare}.lora_B.default.weight"] = (src[mod + ".lora_B.weight"] * scale).contiguous()
    save_file(out, dst)
    return dst


@pytest.mark.parametrize("base", ["diffusers", "original", "comfy-original"])
@pytest.mark.parametrize("lora", ["diffusers", "comfy", "musubi", "diffsynth"])
def test_wan_merge_matches_diffusers(lora, base, tmp_path):
    src = _diffsynth(tmp_path / "ds.safetensors") if lora == "diffsynth" else F / f"wan_{lora}.safetensors"
    # the original file under ComfyUI's prefix: fp32, so 1e-5 still holds
    path = single_file(WAN["original"], tmp_path / "base.safetensors") if base == "comfy-original" else WAN[base]
    got = merged(path, src, tmp_path)
    want = _expected("comfy" if lora == "diffsynth" else lora, "diffusers" if base == "diffusers" else "original")
    assert max_diff(got, want) <= 1e-5


@pytest.mark.parametrize("src,to", [("musubi", "diffusers"), ("comfy", "kohya"), ("diffusers", "kohya"),
                                    ("comfy", "diffusers")])
def test_wan_convert_is_exact(src, to, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"wan_{src}.safetensors"), to=to, out=out)
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    merge(WAN["original"], [str(out)], tmp_path / "o.safetensors")
    assert max_diff(load_file(tmp_path / "o.safetensors"), _expected(src, "original")) <= 1e-5


def test_wan_table_covers_every_linear_weight_of_both_layouts():
    table = dit.TABLES["wan"]
    dif = {k[:-7]: v.shape for k, v in _base().items() if k.endswith(".weight") and v.dim() == 2}
    orig = {k[:-7]: v.shape for k, v in load_file(WAN["original"]).items() if k.endswith(".weight") and v.dim() == 2}
    for col, names, other in (("diffusers", dif, orig), ("original", orig, dif)):
        to = "original" if col == "diffusers" else "diffusers"
        for mod, shape in names.items():
            pieces = table.translate(mod, col, to, shape[1], shape[0])
            assert pieces and len(pieces) == 1, f"{mod} ({col}) is in no row"
            assert other.get(pieces[0].module) == shape, f"{mod} -> {pieces[0].module}"


def test_wan_dialects_are_named_and_other_families_refused(tmp_path):
    for lora, dialect in (("diffusers", "diffusers"), ("comfy", "comfy"), ("musubi", "kohya")):
        d = inspect(F / f"wan_{lora}.safetensors").report["family"]
        assert d["family"] == "wan" and d["dialects"] == [dialect], d
    for base in (F / "flux-bfl.safetensors", F / "sd3-diffusers"):
        with pytest.raises(BadInputError, match="Wan 2.1.*pass a Wan") as e:
            merge(base, [str(F / "wan_comfy.safetensors")], tmp_path / "o")
        assert "\n" not in str(e.value)
    with pytest.raises(BadInputError, match="Flux.1.*Wan"):
        merge(WAN["original"], [str(F / "flux_kohya.safetensors")], tmp_path / "o.safetensors")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.safetensors").exists()


def test_flux_lora_in_comfy_names_merges_like_kohya(tmp_path):
    """The diffusion_model. dialect is the layer's, not Wan's: sd-scripts' Flux factors under ComfyUI's PEFT
    spelling (fused qkv in BFL names) land on the same weights as the kohya file."""
    t = load_file(F / "flux_kohya.safetensors")
    out = {}
    for k, v in t.items():
        mod, _, role = k.partition(".")
        name = "diffusion_model." + _flux_module(mod[len("lora_unet_"):])
        out[f"{name}." + {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
                          "alpha": "alpha"}[role]] = v
    src = tmp_path / "flux_comfy.safetensors"
    save_file(out, src)
    merge(F / "flux-diffusers", [str(src)], tmp_path / "o")
    got = folder_weights(tmp_path / "o")
    want = {**folder_weights(F / "flux-diffusers"), **load_file(F / "expect_flux_kohya.safetensors")}
    assert max_diff(got, want) <= 1e-5


def _flux_module(flat: str) -> str:
    """A BFL module from its kohya underscore form, by the Flux table (never by splitting on "_")."""
    hits = [m for fam, d, m in dit.unspell("lora_unet_" + flat) if fam == "flux" and d == "kohya"]
    assert hits, flat
    return hits[0]


# ------------------------------------------------------------------------------------------------- Wan 2.2 experts
def _two_experts(root: Path) -> Path:
    """A Wan 2.2 A14B-style folder: transformer/ (high noise) and transformer_2/ (low noise, other weights)."""
    import json
    import shutil

    folder = root / "wan22"
    shutil.copytree(WAN["diffusers"], folder)
    shutil.copytree(folder / "transformer", folder / "transformer_2")
    second = {k: (v * 1.5 + 0.01).contiguous() for k, v in _base().items()}
    save_file(second, folder / "transformer_2" / "diffusion_pytorch_model.safetensors")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("which", ["transformer", "transformer_2", "both"])
def test_wan22_second_expert_is_chosen_by_an_option(which, tmp_path):
    """diffusers' update of the comfy LoRA (expect - base) lands on the chosen expert(s) only."""
    folder = _two_experts(tmp_path)
    merge(folder, [str(F / "wan_comfy.safetensors")], tmp_path / "o", transformer=which)
    delta = {k: v - _base()[k] for k, v in _expected("comfy", "diffusers").items()}
    for comp in ("transformer", "transformer_2"):
        base = load_file(folder / comp / "diffusion_pytorch_model.safetensors")
        got = load_file(tmp_path / "o" / comp / "diffusion_pytorch_model.safetensors")
        want = {k: v + delta[k] for k, v in base.items()} if which in (comp, "both") else base
        assert max_diff(got, want) <= 1e-5, comp


def test_wan22_option_without_a_second_expert_is_one_line(tmp_path):
    from tests._sd_util import run_cli

    for base, out in ((WAN["diffusers"], tmp_path / "o"), (WAN["original"], tmp_path / "o.safetensors")):
        with pytest.raises(BadInputError, match="no transformer_2/") as e:
            merge(base, [str(F / "wan_musubi.safetensors")], out, transformer="both")
        assert "\n" not in str(e.value) and not out.exists()
    code, _, err = run_cli("merge", "--base", WAN["diffusers"], "--adapter", F / "wan_comfy.safetensors",
                           "--out", tmp_path / "o2", "--transformer", "transformer_2")
    assert code == 2 and "no transformer_2/" in err and "Traceback" not in err
    code, _, err = run_cli("merge", "--base", _two_experts(tmp_path), "--adapter", F / "wan_comfy.safetensors",
                           "--out", tmp_path / "o3", "--transformer", "both")
    assert code == 0, err
