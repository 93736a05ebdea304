"""Z-Image LoRAs in every dialect (diffusers `transformer.`, ai-toolkit `diffusion_model.` + diffusers names,
musubi-tuner `lora_unet_` + diffusers names, its ComfyUI conversion `lora_unet_` + original names with the fused
qkv, ComfyUI `diffusion_model.` + original names, OneTrainer `lora_transformer_`, DiffSynth-Studio bare names)
merged into both base layouts (diffusers folder, Tongyi's original single file with its fused qkv, with and without
ComfyUI's prefix) against diffusers (ZImagePipeline.lora_state_dict — its non-diffusers converter — +
load_lora_adapter + fuse_lora in fp32; for the comfy file, whose original names diffusers' LoRA converter does not
split, the original + up@down through diffusers' single-file converter), converted exactly, and told apart from
Lumina2 (the same architecture family, mostly the same original names). Fixtures: fixtures/makers/dit_zimage.py."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError, LoraportError
from loraport.names import dit
from tests._dit_util import F, assert_table_covers, folder_weights, maker, max_diff, merged, onetrainer, single_file

ZIMAGE = {"diffusers": F / "zimage-diffusers", "original": F / "zimage-original.safetensors"}


@cache
def _base() -> dict[str, torch.Tensor]:  # read-only: callers build new dicts
    return folder_weights(ZIMAGE["diffusers"])


def _expected(lora: str, layout: str) -> dict[str, torch.Tensor]:
    want = {**_base(), **load_file(F / f"expect_zimage_{lora}.safetensors")}
    return want if layout == "diffusers" else maker("dit_zimage").to_zimage_original(want)


def _onetrainer(dst: Path) -> Path:
    return onetrainer(F / "zimage_diffusers.safetensors", dst)


def _diffsynth(dst: Path) -> Path:
    """The comfy file with bare original names (DiffSynth-Studio's spelling)."""
    save_file({k.removeprefix("diffusion_model."): v for k, v in load_file(F / "zimage_comfy.safetensors").items()},
              dst)
    return dst


OWN = {"onetrainer": (_onetrainer, "diffusers"), "diffsynth": (_diffsynth, "comfy")}  # made here → reference
MERGES = [("diffusers", "diffusers"), ("diffusers", "original"), ("aitoolkit", "diffusers"),
          ("aitoolkit", "comfy-original"), ("musubi", "diffusers"), ("musubi", "original"), ("kohya", "diffusers"),
          ("kohya", "original"), ("comfy", "diffusers"), ("comfy", "original"), ("onetrainer", "original"),
          ("diffsynth", "diffusers")]


@pytest.mark.parametrize("lora,base", MERGES)
def test_zimage_merge_matches_diffusers(lora, base, tmp_path):
    src = OWN[lora][0](tmp_path / "own.safetensors") if lora in OWN else F / f"zimage_{lora}.safetensors"
    path = ZIMAGE["diffusers" if base == "diffusers" else "original"]
    if base == "comfy-original":
        path = single_file(ZIMAGE["original"], tmp_path / "base.safetensors")
    ref = OWN[lora][1] if lora in OWN else lora
    changed, base_sd = load_file(F / f"expect_zimage_{ref}.safetensors"), _base()
    assert sum(not torch.equal(v, base_sd[k]) for k, v in changed.items()) >= 30, "the LoRA changes the model"
    assert max_diff(merged(path, src, tmp_path), _expected(ref, "diffusers" if base == "diffusers" else "original")
                    ) <= 1e-5


@pytest.mark.parametrize("src,to", [("aitoolkit", "kohya"), ("musubi", "kohya"), ("comfy", "diffusers"),
                                    ("kohya", "diffusers"), ("diffusers", "kohya")])
def test_zimage_convert_is_exact(src, to, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"zimage_{src}.safetensors"), to=to, out=out)
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    t = load_file(out)
    assert all(k.startswith("lora_unet_" if to == "kohya" else "transformer.") for k in t)
    if to == "kohya":  # q, k, v → one LoRA on the fused qkv (3 × 16 rows)
        assert t["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape[0] == 48
        assert "lora_unet_layers_0_attention_to_q.lora_up.weight" not in t
    assert max_diff(merged(ZIMAGE["original"], out, tmp_path), _expected(src, "original")) <= 1e-5


def test_zimage_table_covers_every_linear_weight_of_both_layouts():
    assert_table_covers("zimage", ZIMAGE["diffusers"], ZIMAGE["original"])


def test_zimage_is_named_with_its_dialect_and_layout():
    for lora, want in (("diffusers", {"diffusers"}), ("aitoolkit", {"aitoolkit"}), ("comfy", {"comfy"}),
                       ("kohya", {"kohya"}), ("musubi", {"musubi"})):
        d = inspect(F / f"zimage_{lora}.safetensors").report["family"]
        # names both spellings of a prefix share (feed_forward.w1, adaLN_modulation.0) do not add the other dialect
        assert d["family"] == "zimage" and set(d["dialects"]) == want, (lora, d)
    # names only (either spelling alike): the first dialect in DIALECTS' order, as for the two lycoris_ columns
    shared = ["lora_unet_layers_0_feed_forward_w1", "lora_unet_layers_1_adaLN_modulation_0"]
    assert dit.families_of_modules(shared)["zimage"] == (2, {"kohya"})
    for layout in ("diffusers", "original"):
        d = inspect(F / "zimage_kohya.safetensors", base=ZIMAGE[layout]).report["family"]
        assert d["base_layout"] == layout, d


def test_zimage_and_lumina2_bases_and_loras_are_told_apart(tmp_path):
    """Z-Image is Lumina2's architecture with mostly the same original names (cap_embedder, layers.N.attention.qkv,
    feed_forward.w1): each family's LoRA on the other's base is refused in one line naming both."""
    assert dit.base_layout(load_file(F / "lumina2-original.safetensors")).family == "lumina2"
    assert dit.base_layout(load_file(ZIMAGE["original"])).family == "zimage"
    for lora, base, want in (("lumina2_comfy", ZIMAGE["original"], "Lumina-Image 2.0.*Z-Image"),
                             ("lumina2_kohya", ZIMAGE["diffusers"], "Lumina-Image 2.0.*Z-Image"),
                             ("zimage_comfy", F / "lumina2-original.safetensors", "Z-Image.*Lumina-Image 2.0"),
                             ("zimage_kohya", F / "lumina2-diffusers", "Z-Image.*Lumina-Image 2.0"),
                             ("zimage_diffusers", F / "flux-bfl.safetensors", "Z-Image.*Flux.1")):
        out = tmp_path / ("o" if base.is_dir() else "o.safetensors")
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], out)
        assert "\n" not in str(e.value) and not out.exists()
    # attention / feed-forward of `layers` only: spelled alike in both families' original names — read as the
    # base's family, whose fused qkv has other rows (Lumina2's grouped-query k / v)
    shared = {k: v for k, v in load_file(F / "zimage_comfy.safetensors").items()
              if k.startswith("diffusion_model.layers.") and (".attention.qkv." in k or ".feed_forward." in k)}
    save_file(shared, tmp_path / "shared.safetensors")
    assert inspect(tmp_path / "shared.safetensors").report["family"]["family"] == "lumina2"  # listed first
    with pytest.raises(LoraportError, match="shape mismatch.*attention.qkv"):
        merge(F / "lumina2-original.safetensors", [str(tmp_path / "shared.safetensors")], tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def test_zimage_only_dialects_are_not_read_for_other_families():
    """musubi's / ai-toolkit's diffusers-named spellings are Z-Image's trainers': a Flux module so spelled is not
    claimed (nor listed in the support table) for Flux."""
    for name in ("lora_unet_transformer_blocks_0_attn_to_q", "diffusion_model.transformer_blocks.0.attn.to_q"):
        assert not [h for h in dit.unspell(name) if h[0] == "flux" or h[1] in ("musubi", "aitoolkit")], name
    assert ("zimage", "musubi", "layers.0.attention.to_q") in dit.unspell("lora_unet_layers_0_attention_to_q")
    assert "musubi-tuner" not in "".join(ln for ln in dit.support_table().splitlines() if "Z-Image" not in ln)


@pytest.mark.slow  # imports diffusers (~10 s): pytest -m slow tests/test_dit_zimage.py
def test_converted_zimage_files_load_in_diffusers(tmp_path):
    """What loraport writes is what diffusers reads: the comfy file (original names diffusers' LoRA converter does
    not split) converted to the diffusers dialect fuses in diffusers to the comfy reference; the kohya file
    written from musubi's (fused qkv, attention_out) loads through diffusers' own Z-Image converter. (That converter
    drops, with a warning, kohya's original top-level names — x_embedder, final_layer — and siglip_refiner: for
    diffusers, convert those --to diffusers.)"""
    from diffusers import ZImagePipeline

    from tests._dit_util import diffusers_fuse

    make = maker("dit_zimage").micro_zimage
    for src, to in (("comfy", "diffusers"), ("musubi", "kohya")):
        out = tmp_path / f"{src}-{to}.safetensors"
        convert(str(F / f"zimage_{src}.safetensors"), to=to, out=out)
        assert max_diff(diffusers_fuse(make, _base(), ZImagePipeline, out), _expected(src, "diffusers")) <= 1e-5


@pytest.mark.parametrize("layout", list(ZIMAGE))
def test_aitoolkit_lokr_merges_as_lycoris_computes_it(layout, tmp_path):
    """ai-toolkit's Z-Image LoKr (`diffusion_model.` + diffusers names, LyCORIS's `lokr_w1` / `lokr_w2[_a/_b]` /
    `alpha`): diffusers has no Z-Image LoKr converter, so the reference is lycoris-lora's own LokrModule wrapped
    around each base linear — the weight its forward uses (the Kronecker product times LyCORIS's scale: none for
    full factors, alpha/rank for a decomposed one), checked against that forward on inputs — merged into both
    layouts within 1e-5 (into the original file, q/k/v's deltas land on the rows of the fused qkv). Not its
    get_diff_weight / get_merged_weight: in lycoris-lora 4.1.3 they apply a decomposed LoKr's scale twice."""
    lokr = pytest.importorskip("lycoris.modules.lokr")
    g = torch.Generator().manual_seed(11)
    want, sd = dict(_base()), {}
    for mod, full in (("layers.0.attention.to_q", True), ("layers.0.attention.to_v", True),
                      ("layers.1.feed_forward.w2", False), ("layers.0.attention.to_out.0", True)):
        w = _base()[f"{mod}.weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        m = lokr.LokrModule("x", lin, multiplier=1.0, lora_dim=2, alpha=4.0, factor=2, full_matrix=full)
        state = {k: (torch.randn(v.shape, generator=g) if k != "alpha" else v) for k, v in m.state_dict().items()}
        m.load_state_dict(state)
        assert full or ("lokr_w2_a" in state and m.scale == 2.0), "a decomposed factor: alpha/rank = 4/2 applies"
        with torch.no_grad():
            lin.weight.copy_(w.float())
            want[f"{mod}.weight"] = w.float() + m.get_weight(tuple(w.shape)).float()
            m.apply_to()  # lin now runs through the LoKr module
            x = torch.randn(3, w.shape[1], generator=g)
            assert torch.allclose(lin(x), x @ want[f"{mod}.weight"].t(), atol=1e-4), "the forward's own weight"
        sd.update({f"diffusion_model.{mod}.{k}": v for k, v in state.items()})
    save_file(sd, tmp_path / "lokr.safetensors")
    if layout == "original":
        want = maker("dit_zimage").to_zimage_original(want)
    assert max_diff(merged(ZIMAGE[layout], tmp_path / "lokr.safetensors", tmp_path), want) <= 1e-5
