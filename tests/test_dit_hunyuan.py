"""HunyuanVideo LoRAs in every dialect (diffusers, diffusion-pipe / ComfyUI `diffusion_model.`, musubi-tuner
`lora_unet_`) merged into both base layouts (diffusers folder, Tencent's original single file, with and without
ComfyUI's `model.diffusion_model.` prefix) against what diffusers computes (its HunyuanVideo LoRA converter +
load_lora_adapter + fuse_lora in fp32, or, where that converter is wrong, the original file + up@down through its
single-file converter), converted exactly, and told apart from Flux, whose original names it shares in part.
Fixtures: fixtures/makers/dit_hunyuan.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError
from tests._dit_util import COMFY, F, folder_weights, maker, max_diff, merged, onetrainer, single_file

HY = {"diffusers": F / "hunyuan-diffusers", "original": F / "hunyuan-original.safetensors"}
LORAS = ("diffusers", "comfy", "comfy_full", "musubi")


def _maker():
    return maker("dit_hunyuan")


def _base() -> dict[str, torch.Tensor]:
    return folder_weights(HY["diffusers"])


def _expected(lora: str, layout: str) -> dict[str, torch.Tensor]:
    want = {**_base(), **load_file(F / f"expect_hunyuan_{lora}.safetensors")}
    return want if layout == "diffusers" else _maker().hunyuan_to_original(want)


def _merged(base: str, lora: Path, tmp: Path) -> dict[str, torch.Tensor]:
    return merged(single_file(HY["original"], tmp / "base.safetensors") if base == "comfy-original" else HY[base],
                  lora, tmp)


def _comfy_saved(dst: Path) -> Path:
    """The comfy file as ComfyUI's LoRA save / extract nodes write it: diffusion_model.<original> with kohya's
    lora_down / lora_up factor names, no alpha (scale 1, as in the diffusion-pipe file)."""
    t = load_file(F / "hunyuan_comfy.safetensors")
    save_file({k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in t.items()}, dst)
    return dst


def _onetrainer(dst: Path) -> Path:
    return onetrainer(F / "hunyuan_diffusers.safetensors", dst)


MADE = {"onetrainer": (_onetrainer, "diffusers"), "comfy_saved": (_comfy_saved, "comfy")}  # → (maker, reference)


@pytest.mark.parametrize("base", ["diffusers", "original", "comfy-original"])
@pytest.mark.parametrize("lora", [*LORAS, *MADE])
def test_hunyuan_merge_matches_diffusers(lora, base, tmp_path):
    src = MADE[lora][0](tmp_path / "m.safetensors") if lora in MADE else F / f"hunyuan_{lora}.safetensors"
    lora = MADE[lora][1] if lora in MADE else lora
    want = _expected(lora, "diffusers" if base == "diffusers" else "original")
    assert len(load_file(F / f"expect_hunyuan_{lora}.safetensors")) >= 10, "the LoRA changes the model"
    assert max_diff(_merged(base, src, tmp_path), want) <= 1e-5


@pytest.mark.parametrize("src,to", [("musubi", "diffusers"), ("comfy_full", "diffusers"), ("diffusers", "kohya"),
                                    ("comfy", "kohya")])
def test_hunyuan_convert_is_exact(src, to, tmp_path):
    """fused ⇄ split: linear1 / qkv LoRAs become per-part LoRAs sharing A (diffusers), per-part LoRAs with their
    own A one block-diagonal LoRA on the fused tensor (kohya); the final adaLN's halves swap on the way."""
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"hunyuan_{src}.safetensors"), to=to, out=out)
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    keys = load_file(out)
    if to == "kohya":
        assert all(k.startswith("lora_unet_") for k in keys)
    else:
        assert all(k.startswith("transformer.") for k in keys)
    assert max_diff(_merged("original", out, tmp_path), _expected(src, "original")) <= 1e-5


@pytest.mark.slow  # ~27 s on 2 shared cores, most of it importing diffusers: pytest -m slow tests/test_dit_hunyuan.py
def test_hunyuan_converted_files_load_in_diffusers(tmp_path):
    """What loraport writes in the diffusers dialect is what diffusers' HunyuanVideo loader reads: the musubi file
    (fused qkv and linear1, which diffusers' converter cannot split at this width) fuses to the reference."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin

    out = tmp_path / "c.safetensors"
    convert(str(F / "hunyuan_musubi.safetensors"), to="diffusers", out=out)
    mk = _maker()

    def load(m):  # per-module alphas travel in lora_adapter_metadata (alpha_pattern)
        state, meta = HunyuanVideoLoraLoaderMixin.lora_state_dict(str(out), return_lora_metadata=True)
        m.load_lora_adapter(state, prefix="transformer", metadata=meta)

    got = mk.fused_reference(mk.micro_hunyuan(), load, mk.micro_hunyuan)  # the micro model's init is the base's
    assert max_diff(got, _expected("musubi", "diffusers")) <= 1e-5


def test_hunyuan_dialects_are_named_and_told_from_flux(tmp_path):
    """double_blocks / single_blocks / linear1 / final_layer are Flux's names too: the token refiner, img_mod.linear,
    img_mlp.fc1 decide, the bases are told by the refiner, and a LoRA of one on the other's base is one line."""
    for lora, dialect in (("diffusers", "diffusers"), ("comfy", "comfy"), ("comfy_full", "comfy"),
                          ("musubi", "kohya"), ("onetrainer", "onetrainer"), ("comfy_saved", "comfy")):
        src = MADE[lora][0](tmp_path / "m.safetensors") if lora in MADE else F / f"hunyuan_{lora}.safetensors"
        d = inspect(src).report["family"]
        assert d["family"] == "hunyuan_video" and d["dialects"] == [dialect], d
    for base, lora, want in ((F / "flux-bfl.safetensors", "hunyuan_musubi", "HunyuanVideo.*Flux.1"),
                             (F / "flux-diffusers", "hunyuan_comfy", "HunyuanVideo.*Flux.1"),
                             (HY["original"], "flux_kohya", "Flux.1.*HunyuanVideo"),
                             (HY["diffusers"], "flux_kohya_full", "Flux.1.*HunyuanVideo"),
                             (F / "wan-diffusers", "hunyuan_diffusers", "HunyuanVideo.*Wan")):
        out = tmp_path / ("o" if base.is_dir() else "o.safetensors")
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], out)
        assert "\n" not in str(e.value) and not out.exists()
    from tests._sd_util import run_cli

    code, _, err = run_cli("merge", "--base", HY["original"], "--adapter", F / "flux_kohya.safetensors",
                           "--out", tmp_path / "cli.safetensors")
    assert code == 2 and "HunyuanVideo" in err and "Flux.1" in err and "Traceback" not in err
    assert not (tmp_path / "cli.safetensors").exists()


def test_flux_still_merges_into_flux_bases(tmp_path):
    """HunyuanVideo's bases carry Flux's anchors (single_blocks.0.linear1, single_transformer_blocks.0.proj_mlp), so
    its own are tried first; a LoRA both tables know (musubi's linear1 / linear2 only, the same names and, here,
    shapes) goes into either family's base as that base's: alpha/r·up@down on the same tensors."""
    t = load_file(F / "hunyuan_musubi.safetensors")
    shared = {k: v for k, v in t.items() if "_linear1." in k or "_linear2." in k}
    p = tmp_path / "shared.safetensors"
    save_file(shared, p)
    for base in (HY["original"], F / "flux-bfl.safetensors"):
        out = tmp_path / f"{base.stem}.safetensors"
        merge(base, [str(p)], out)
        want = load_file(base)
        for k in shared:
            if k.endswith(".lora_down.weight"):
                mod = k[:-len(".lora_down.weight")]
                target = mod.removeprefix("lora_unet_").replace("_", ".").replace("single.blocks", "single_blocks")
                scale = float(shared[mod + ".alpha"]) / shared[k].shape[0]
                want[target + ".weight"] += scale * (shared[mod + ".lora_up.weight"] @ shared[k])
        assert len(shared) == 12 and max_diff(load_file(out), want) <= 1e-5, base.name


def test_a_lora_on_the_shared_names_is_read_as_the_base_says(tmp_path):
    """A diffusers LoRA on the double / single blocks only is Flux's names too: without a base it is read as Flux
    (the first family) and says so, and converting it to kohya names needs the family said; with a HunyuanVideo
    base it is HunyuanVideo's, so `convert --to kohya`
    writes musubi's names (img_mlp_fc1, img_mod_linear), not Flux's (img_mlp_0, img_mod_lin)."""
    from safetensors import safe_open

    with safe_open(F / "hunyuan_diffusers.safetensors", "pt") as f:  # lora_adapter_metadata: alpha 8
        shared = {k: f.get_tensor(k) for k in f.keys() if "context_embedder" not in k}
        meta = f.metadata()
    src = tmp_path / "shared.safetensors"
    save_file(shared, src, meta)
    rep = inspect(src).report
    assert rep["family"]["family"] == "flux" and rep["family"]["also_fits"] == ["hunyuan_video"]
    assert any("fit HunyuanVideo too" in n and "--base" in n for n in rep["notes"])
    out = tmp_path / "k.safetensors"
    rep = convert(str(src), to="kohya", out=out, base=HY["original"])
    names = {k.split(".")[0] for k in load_file(out)}
    assert "lora_unet_double_blocks_0_img_mlp_fc1" in names and "lora_unet_double_blocks_0_img_mod_linear" in names
    assert rep.report["max_abs_diff"] <= 1e-6
    # diffusers' fuse of the whole file, on the modules the subset keeps (each module's update is its own)
    want = {**_base(), **{k: v for k, v in load_file(F / "expect_hunyuan_diffusers.safetensors").items()
                          if "context_embedder" not in k}}
    want = _maker().hunyuan_to_original(want)
    for i, lora in enumerate((src, out)):
        (tmp_path / str(i)).mkdir()
        assert max_diff(_merged("original", lora, tmp_path / str(i)), want) <= 1e-5
    # without a base, kohya names are refused until the user says which family (they differ: img_mlp_0 / fc1)
    flux, hy = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    with pytest.raises(BadInputError, match="HunyuanVideo.*family="):
        convert(str(src), to="kohya", out=flux)
    convert(str(src), to="kohya", out=flux, read_options={"family": "flux"})
    assert "lora_unet_double_blocks_0_img_mlp_0" in {k.split(".")[0] for k in load_file(flux)}
    convert(str(src), to="kohya", out=hy, read_options={"family": "hunyuan_video"})
    assert load_file(hy).keys() == load_file(out).keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_hunyuan_16bit_and_fp8_single_files(dtype, tmp_path):
    """ComfyUI's repackaged bf16 file (model.diffusion_model. prefix) and the plain fp8 files HunyuanVideo is mostly
    run from (linear weights `.to(float8_e4m3fn)`, the rest bf16): the merge is diffusers' ΔW on the stored
    weights, written back in each tensor's dtype (one rounding step of that dtype at most)."""
    orig = load_file(HY["original"])
    fp8 = dtype == torch.float8_e4m3fn
    stored = {k: v.to(dtype if not fp8 or (k.endswith(".weight") and v.dim() == 2) else torch.bfloat16)
              for k, v in orig.items()}
    prefix = "" if fp8 else COMFY
    path = single_file(stored, tmp_path / "base.safetensors", prefix)
    out = tmp_path / "o.safetensors"
    merge(path, [str(F / "hunyuan_musubi.safetensors")], out)
    got = {k.removeprefix(prefix): v for k, v in load_file(out).items()}
    want = _expected("musubi", "original")
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in stored.items()}
    step, tiny = (2 ** -3, 2 ** -9) if fp8 else (2 ** -7, 0.0)
    changed = 0
    for k, w in want.items():
        target = stored[k].float() + (w - orig[k])  # ΔW on the stored weight
        err = (got[k].float() - target).abs() - step * target.abs() - tiny
        assert float(err.max()) <= 1e-6, k
        changed += not torch.equal(got[k], stored[k])
    assert changed >= 20


@pytest.mark.parametrize("lora", [*LORAS, *MADE])
def test_hunyuan_loras_merge_into_a_framepack_base(lora, tmp_path):
    """FramePack (HunyuanVideoFramepackTransformer3DModel) is HunyuanVideo's transformer plus an image projection
    and a clean-latent embedder; its LoRAs are HunyuanVideo's. Into a FramePack diffusers folder holding the
    HunyuanVideo base's weights, every dialect gives what diffusers gives on HunyuanVideo (the maker checks that
    diffusers' FramePack pipeline fuses the diffusers LoRA the same) and leaves the extra modules untouched."""
    fp = F / "framepack-diffusers"
    base = folder_weights(fp)
    extras = {k for k in base if k not in _base()}
    assert any(k.startswith("image_projection.") for k in extras) and any("clean_x_embedder" in k for k in extras)
    src = MADE[lora][0](tmp_path / "m.safetensors") if lora in MADE else F / f"hunyuan_{lora}.safetensors"
    lora = MADE[lora][1] if lora in MADE else lora
    want = {**base, **load_file(F / f"expect_hunyuan_{lora}.safetensors")}
    assert inspect(src, base=fp).report["family"]["family"] == "hunyuan_video"
    assert max_diff(merged(fp, src, tmp_path), want) <= 1e-5
