"""Lumina-Image 2.0 LoRAs in every dialect (diffusers `transformer.`, diffusion-pipe / ComfyUI `diffusion_model.`,
sd-scripts lora_lumina `lora_unet_`, OneTrainer `lora_transformer_`) merged into both base layouts (diffusers
folder, Alpha-VLLM's original single file with its fused grouped-query qkv, with and without ComfyUI's prefix)
against diffusers (Lumina2Pipeline.lora_state_dict / its diffusion_model. converter + load_lora_adapter +
fuse_lora in fp32; for kohya the original + alpha/r·up@down through diffusers' single-file converter), and
converted exactly. Fixtures: fixtures/makers/dit_lumina2.py."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from safetensors.torch import load_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError
from loraport.names import dit
from tests._dit_util import F, assert_table_covers, folder_weights, maker, max_diff, merged, onetrainer, single_file

LUMINA = {"diffusers": F / "lumina2-diffusers", "original": F / "lumina2-original.safetensors"}


@cache
def _base() -> dict[str, torch.Tensor]:  # read-only: callers build new dicts
    return folder_weights(LUMINA["diffusers"])


def _expected(lora: str, layout: str) -> dict[str, torch.Tensor]:
    want = {**_base(), **load_file(F / f"expect_lumina2_{lora}.safetensors")}
    return want if layout == "diffusers" else maker("dit_lumina2").to_lumina2_original(want)


MERGES = [("diffusers", "diffusers"), ("diffusers", "original"), ("comfy", "diffusers"), ("comfy", "comfy-original"),
          ("kohya", "diffusers"), ("kohya", "original"), ("onetrainer", "original")]


@pytest.mark.parametrize("lora,base", MERGES)
def test_lumina2_merge_matches_diffusers(lora, base, tmp_path):
    src = onetrainer(F / "lumina2_diffusers.safetensors", tmp_path / "ot.safetensors") if lora == "onetrainer" \
        else F / f"lumina2_{lora}.safetensors"
    path = LUMINA["diffusers" if base == "diffusers" else "original"]
    if base == "comfy-original":
        path = single_file(LUMINA["original"], tmp_path / "base.safetensors")
    ref = "diffusers" if lora == "onetrainer" else lora
    changed, base_sd = load_file(F / f"expect_lumina2_{ref}.safetensors"), _base()
    assert sum(not torch.equal(v, base_sd[k]) for k, v in changed.items()) >= 10, "the LoRA changes the model"
    assert max_diff(merged(path, src, tmp_path), _expected(ref, "diffusers" if base == "diffusers" else "original")
                    ) <= 1e-5


@pytest.mark.parametrize("src,to,base", [("comfy", "diffusers", None), ("kohya", "diffusers", None),
                                         ("diffusers", "kohya", None), ("diffusers", "kohya", "diffusers")])
def test_lumina2_convert_is_exact(src, to, base, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"lumina2_{src}.safetensors"), to=to, out=out, base=None if base is None else LUMINA[base])
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    t = load_file(out)
    assert all(k.startswith("lora_unet_" if to == "kohya" else "transformer.") for k in t)
    if to == "kohya":  # q, k, v with their own A → one LoRA on the fused qkv: q 16 + k 8 + v 8 rows
        assert t["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape[0] == 32
    assert max_diff(merged(LUMINA["original"], out, tmp_path), _expected(src, "original")) <= 1e-5


def test_lumina2_grouped_qkv_parts_are_the_rest_in_equal_shares():
    """q is the input width; k and v share what is left (diffusers hard-codes 2304 / 768 / 768)."""
    assert [dit.part_rows(("h", "*", "*"), k, 2304, 3840) for k in range(3)] == [(0, 2304), (2304, 3072),
                                                                                 (3072, 3840)]
    assert dit.part_rows(("h", "*", "*"), 2, 2304, None, own=768) == (3072, 3840)
    assert dit.part_rows(("h", "*", "*"), 1, 2304, 3841) is None  # no equal shares: not sized


def test_lumina2_table_covers_every_linear_weight_of_both_layouts():
    assert_table_covers("lumina2", LUMINA["diffusers"], LUMINA["original"])


def test_lumina2_is_named_and_other_families_refused(tmp_path):
    for lora, dialect in (("diffusers", "diffusers"), ("comfy", "comfy"), ("kohya", "kohya")):
        d = inspect(F / f"lumina2_{lora}.safetensors").report["family"]
        assert d["family"] == "lumina2" and d["dialects"] == [dialect], d
    d = inspect(F / "lumina2_kohya.safetensors", base=LUMINA["original"]).report["family"]
    assert d["base_layout"] == "original", d
    for lora, base, want in (("lumina2_comfy", F / "flux-bfl.safetensors", "Lumina-Image 2.0.*Flux.1"),
                             ("flux_kohya", LUMINA["original"], "Flux.1.*Lumina-Image 2.0"),
                             ("lumina2_diffusers", F / "chroma-diffusers", "Lumina-Image 2.0.*Chroma")):
        out = tmp_path / ("o" if base.is_dir() else "o.safetensors")
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], out)
        assert "\n" not in str(e.value) and not out.exists()


@pytest.mark.slow  # imports diffusers (~10 s): pytest -m slow tests/test_dit_lumina2.py
def test_converted_lumina2_files_load_in_diffusers(tmp_path):
    """What loraport writes is what diffusers reads: the kohya file (no diffusers loader) converted to the
    diffusers dialect, q / k / v cut from the fused grouped-query qkv, fuses in diffusers to the kohya reference."""
    from diffusers import Lumina2Pipeline

    from tests._dit_util import diffusers_fuse

    out = tmp_path / "c.safetensors"
    convert(str(F / "lumina2_kohya.safetensors"), to="diffusers", out=out)
    got = diffusers_fuse(maker("dit_lumina2").micro_lumina2, _base(), Lumina2Pipeline, out)
    assert max_diff(got, _expected("kohya", "diffusers")) <= 1e-5
