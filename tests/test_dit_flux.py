"""Flux.1 LoRAs in every dialect (kohya / sd-scripts BFL names, OneTrainer, diffusers, XLabs) merged into both
base layouts (diffusers folder, BFL single file; ComfyUI's prefixed bf16 copy) against what diffusers computes,
and converted between dialects exactly; the same for SD3 / SD3.5 (kohya lora_sd3 names, diffusers).
Fixtures: fixtures/makers/dit.py (a micro FluxTransformer2DModel; the
expect files are diffusers' own load_lora_adapter + fuse_lora, or diffusers' single-file converter)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import convert, inspect, merge
from loraport.errors import BadInputError, LoraportError
from loraport.names import dit
from tests._dit_util import F, folder_weights, maker, max_diff, merged, onetrainer
from tests._sd_util import run_cli

BASES = {"diffusers": F / "flux-diffusers", "bfl": F / "flux-bfl.safetensors",
         "comfy-bf16": F / "flux-comfy-bf16.safetensors"}
LORAS = {"diffusers": "expect_flux_diffusers", "onetrainer": "expect_flux_diffusers", "kohya": "expect_flux_kohya",
         "kohya_full": "expect_flux_kohya_full", "xlabs": "expect_flux_xlabs"}


SD3 = {"diffusers": F / "sd3-diffusers", "original": F / "sd3-original.safetensors"}


def _base_sd() -> dict[str, torch.Tensor]:
    return folder_weights(BASES["diffusers"])


def _expected(lora: str) -> dict[str, torch.Tensor]:
    return {**_base_sd(), **load_file(F / f"{LORAS[lora]}.safetensors")}


def _to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names → BFL (the maker's inverse of diffusers' single-file converter, checked there)."""
    mod = maker("dit")
    return mod.to_bfl(sd, mod.CONFIG["num_layers"], mod.CONFIG["num_single_layers"])


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("lora", list(LORAS))
def test_merge_matches_diffusers(lora, base, tmp_path):
    want = _expected(lora)
    assert sum(not torch.equal(want[k], v) for k, v in _base_sd().items()) >= 9, "the LoRA changes the model"
    if base != "diffusers":
        want = _to_bfl(want)
    got = merged(BASES[base], F / f"flux_{lora}.safetensors", tmp_path)
    rel = 0.0
    if base == "comfy-bf16":  # the reference's ΔW on the bf16 weights, stored in bf16: one bf16 step apart at most
        b32 = _to_bfl(_base_sd())
        want = {k: (v.to(torch.bfloat16).float() + want[k] - v).to(torch.bfloat16).float() for k, v in b32.items()}
        rel = 2 ** -7
    assert max_diff(got, want, rel=rel) <= 1e-5


CONVERSIONS = [("kohya", "diffusers"), ("kohya_full", "diffusers"), ("diffusers", "kohya"), ("onetrainer", "kohya"),
               ("kohya", "kohya"), ("xlabs", "diffusers")]
# every pair without a base (canonical names), the kohya <-> diffusers pairs against each base layout too
CONVERT_CASES = [(*c, None) for c in CONVERSIONS] + [(*c, b) for c in CONVERSIONS[:3] for b in ("diffusers", "bfl")]


@pytest.mark.parametrize("src,to,base", CONVERT_CASES)
def test_convert_between_dialects_is_exact(src, to, base, tmp_path):
    out = tmp_path / "c.safetensors"
    # without a base a diffusers-named Flux LoRA also fits HunyuanVideo's / Flux.2's tables: the user says which
    opts = {"family": "flux"} if base is None and src in ("diffusers", "onetrainer") else None
    rep = convert(str(F / f"flux_{src}.safetensors"), to=to, out=out, base=None if base is None else BASES[base],
                  read_options=opts)
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    keys = list(load_file(out))
    if to == "kohya":
        assert all(k.startswith("lora_unet_") for k in keys)
        assert not any("transformer_blocks" in k for k in keys), "kohya files spell BFL module names"
    else:
        assert all(k.startswith("transformer.") for k in keys)
        assert not any("double_blocks" in k for k in keys)
    got = merged(BASES["diffusers"], out, tmp_path)
    assert max_diff(got, _expected(src)) <= 1e-5


def test_xlabs_to_kohya_needs_the_base_for_linear1(tmp_path):
    """XLabs' single-block qkv LoRA covers q, k, v of linear1 but not its MLP rows, whose count only the base
    knows: with a base the kohya file is exact (MLP rows zero), without one it is refused."""
    with pytest.raises(BadInputError, match="linear1.*pass (--)?base"):
        convert(str(F / "flux_xlabs.safetensors"), to="kohya", out=tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    for base in ("diffusers", "bfl"):
        out = tmp_path / f"{base}.safetensors"
        rep = convert(str(F / "flux_xlabs.safetensors"), to="kohya", out=out, base=BASES[base])
        assert rep.report["max_abs_diff"] <= 1e-6
        up = load_file(out)["lora_unet_single_blocks_1_linear1.lora_up.weight"]
        assert up.shape[0] == 3 * 16 + 64 and not up[48:].any()
        (tmp_path / base).mkdir()
        assert max_diff(merged(BASES["diffusers"], out, tmp_path / base), _expected("xlabs")) <= 1e-5


def test_fused_qkv_splits_sharing_A_and_fuses_back(tmp_path):
    """A rank-r LoRA on qkv becomes three rank-r LoRAs sharing A; three LoRAs with their own A become one rank-3r
    LoRA on the fused tensor; sd-scripts' split_qkv form (block-diagonal up) becomes three rank-r LoRAs."""
    out = tmp_path / "d.safetensors"
    convert(str(F / "flux_kohya.safetensors"), to="diffusers", out=out)
    t = load_file(out)
    a = [t[f"transformer.transformer_blocks.0.attn.to_{x}.lora_A.weight"] for x in "qkv"]
    assert a[0].shape[0] == 4 and torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])
    assert t["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"].shape[0] == 4  # split_qkv block trimmed
    k = tmp_path / "k.safetensors"
    convert(str(F / "flux_diffusers.safetensors"), to="kohya", out=k, read_options={"family": "flux"})
    t = load_file(k)
    assert t["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12
    assert t["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 3 * 16 + 64


@pytest.mark.slow  # ~13 s, most of it importing diffusers: pytest -m slow tests/test_dit_flux.py
def test_converted_files_load_in_diffusers(tmp_path):
    """What loraport writes is what diffusers reads: its kohya converter and its PEFT loader fuse our files to
    the same weights as the originals."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    mk = maker("dit")
    model = diffusers.FluxTransformer2DModel.from_pretrained(BASES["diffusers"] / "transformer")
    # diffusers' kohya converter hard-codes Flux-dev's linear1 split (3072 / 12288), so the kohya file it reads
    # back is the one without linear1: kohya -> diffusers (read by PEFT's loader) -> kohya (by the converter)
    there = tmp_path / "kohya-diffusers.safetensors"
    convert(str(F / "flux_kohya.safetensors"), to="diffusers", out=there)
    back = tmp_path / "diffusers-kohya.safetensors"
    convert(str(there), to="kohya", out=back, read_options={"family": "flux"})  # diffusers names fit HunyuanVideo too
    for out in (there, back):

        def load(m, out=out):
            state, meta = FluxLoraLoaderMixin.lora_state_dict(str(out), return_lora_metadata=True)
            m.load_lora_adapter(state, prefix="transformer", metadata=meta)

        got = mk.fused_reference(model, load)
        assert max_diff(got, _expected("kohya")) <= 1e-5, out.name


def test_inspect_names_family_dialect_and_layouts():
    for lora, dialect in (("kohya", "kohya"), ("onetrainer", "onetrainer"), ("diffusers", "diffusers"),
                          ("xlabs", "xlabs")):
        rep = inspect(F / f"flux_{lora}.safetensors")
        d = rep.report["family"]
        assert d["family"] == "flux" and d["dialects"] == [dialect], d
        assert any("Flux.1" in n and "expects" in n for n in rep.report["notes"])
    rep = inspect(F / "flux_kohya.safetensors", base=BASES["bfl"])
    assert rep.report["family"]["base_layout"] == "original"


def test_flux_lora_on_another_family_is_one_line(tmp_path):
    sd_base = F.parent / "sd" / "base"
    for lora in ("kohya", "diffusers", "onetrainer", "xlabs"):
        with pytest.raises(BadInputError) as e:
            merge(sd_base, [str(F / f"flux_{lora}.safetensors")], tmp_path / "o")
        msg = str(e.value)
        assert "Flux.1" in msg and "SD 1.x" in msg and "\n" not in msg
    code, _, err = run_cli("merge", "--base", sd_base, "--adapter", F / "flux_kohya.safetensors",
                           "--out", tmp_path / "o2")
    assert code == 2 and "Flux.1" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


QKV = "lora_unet_double_blocks_0_img_attn_qkv."
LYCORIS_QKV = {  # LyCORIS kinds on the fused qkv [48, 16]: their keys and shapes
    "loha": (("hada_w1_a", (48, 2)), ("hada_w1_b", (2, 16)), ("hada_w2_a", (48, 2)), ("hada_w2_b", (2, 16))),
    "lokr": (("lokr_w1", (4, 2)), ("lokr_w2_a", (12, 2)), ("lokr_w2_b", (2, 8))),
    "full": (("diff", (48, 16)),),
}


def _qkv_dw(f: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """ΔW of the fused qkv computed here from the file (alpha 2, rank 2: scale 1)."""
    if kind == "loha":
        return (f[QKV + "hada_w1_a"] @ f[QKV + "hada_w1_b"]) * (f[QKV + "hada_w2_a"] @ f[QKV + "hada_w2_b"])
    if kind == "lokr":
        return torch.kron(f[QKV + "lokr_w1"], f[QKV + "lokr_w2_a"] @ f[QKV + "lokr_w2_b"])
    return f[QKV + "diff"]


@pytest.mark.parametrize("kind", list(LYCORIS_QKV))
def test_lycoris_on_fused_qkv_merges_into_both_layouts(kind, tmp_path):
    """A LoHa / LoKr / full update on the fused qkv: into the BFL file it merges as is (checked against the
    product computed here); into the diffusers folder each of q, k, v takes its rows of it (a LoHa's rows are a
    LoHa, a LoKr's are built from its factors), so both merges are the same model."""
    g = torch.Generator().manual_seed(0)
    f = {QKV + k: torch.randn(*s, generator=g) * 0.2 for k, s in LYCORIS_QKV[kind]}
    f[QKV + "alpha"] = torch.tensor(2.0)
    p = tmp_path / f"{kind}.safetensors"
    save_file(f, p)
    got = merged(BASES["bfl"], p, tmp_path)
    base = load_file(BASES["bfl"])
    want = base["double_blocks.0.img_attn.qkv.weight"] + _qkv_dw(f, kind)
    assert torch.allclose(got["double_blocks.0.img_attn.qkv.weight"], want, atol=1e-6)
    (tmp_path / "d").mkdir()
    split = _to_bfl(merged(BASES["diffusers"], p, tmp_path / "d"))
    assert max_diff(split, got) <= 1e-6


def test_input_axis_dora_on_a_fused_qkv_is_refused_for_split(tmp_path):
    """Input-axis DoRA (dora_scale [1, in], LyCORIS < 3.2) normalises each column over all of q, k and v: no
    part of it is the update of q alone. Merged into the BFL file as is; into the diffusers folder refused with
    the way out, nothing written."""
    g = torch.Generator().manual_seed(0)
    f = {QKV + k: torch.randn(*s, generator=g) * 0.2 for k, s in LYCORIS_QKV["loha"]}
    f[QKV + "dora_scale"] = torch.rand(1, 16, generator=g) + 0.5
    p = tmp_path / "dora.safetensors"
    save_file(f, p)
    merged(BASES["bfl"], p, tmp_path)
    with pytest.raises(LoraportError, match="cannot be split.*DoRA norm.*single file"):
        merge(BASES["diffusers"], [str(p)], tmp_path / "o")
    assert not (tmp_path / "o").exists()


COVERED = {"flux": (BASES["diffusers"], BASES["bfl"]), "sd3": (SD3["diffusers"], SD3["original"]),
           "hunyuan_video": (F / "hunyuan-diffusers", F / "hunyuan-original.safetensors"),
           "ltx_video": (F / "ltx-diffusers", F / "ltx-original.safetensors")}  # (folder, original single file)


@pytest.mark.parametrize("family", list(COVERED))
def test_table_covers_every_linear_weight_of_both_layouts(family):
    """Each 2-D weight of the diffusers model and of the original file is some table row's, and every row maps
    between two tensors of matching shape (parts sized from the input width)."""
    table = dit.TABLES[family]
    folder, single = COVERED[family]
    dif = {k[:-7]: v.shape for k, v in folder_weights(folder).items()
           if k.endswith(".weight") and v.dim() == 2}
    bfl = {k[:-7].removeprefix("model.diffusion_model."): v.shape for k, v in load_file(single).items()
           if k.endswith(".weight") and v.dim() == 2}
    for col, names, other in (("diffusers", dif, bfl), ("original", bfl, dif)):
        to = "original" if col == "diffusers" else "diffusers"
        for mod, shape in names.items():
            pieces = table.translate(mod, col, to, shape[1], shape[0])
            assert pieces, f"{mod} ({col}) is in no row"
            covered = sum((p.lora_rows[1] - p.lora_rows[0]) if p.lora_rows else shape[0] for p in pieces)
            assert covered == shape[0], mod
            for p in pieces:
                assert p.module in other, f"{mod} -> {p.module}"
                rows = (p.rows[1] - p.rows[0]) if p.rows else other[p.module][0]
                assert rows == ((p.lora_rows[1] - p.lora_rows[0]) if p.lora_rows else shape[0])


def test_every_family_has_a_spec_section():
    text = (Path(__file__).resolve().parents[1] / "formats" / "dit.md").read_text(encoding="utf-8")
    for fam in dit.FAMILIES:
        assert f"## {fam.title}" in text
    for d in dit.DIALECTS:
        assert f"`{d}`" in text
    json.dumps(dit.DIALECT_TITLES)


def test_readme_dit_table_is_the_tables():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- dit-matrix:start -->\n(.*?)\n<!-- dit-matrix:end -->", readme, re.S)
    assert block and block.group(1).strip() == dit.support_table().strip(), (
        "README's DiT table is out of date: paste loraport.names.dit.support_table()")


# ------------------------------------------------------------------------------------------------- SD3 / SD3.5
def _sd3_expected(lora: str, layout: str) -> dict[str, torch.Tensor]:
    base = folder_weights(SD3["diffusers"])
    want = {**base, **load_file(F / f"expect_sd3_{lora}.safetensors")}
    if layout == "diffusers":
        return want
    mk = maker("dit")
    return mk.sd3_to_original(want, mk.SD3_CONFIG["num_layers"], mk.SD3_CONFIG["dual_attention_layers"])


@pytest.mark.parametrize("base", list(SD3))
@pytest.mark.parametrize("lora", ["diffusers", "kohya", "onetrainer"])
def test_sd3_merge_matches_diffusers(lora, base, tmp_path):
    """diffusers' PEFT loader for its own dialect (and the same factors in OneTrainer's names); for kohya
    (diffusers has no SD3 kohya converter) the original file plus up@down, converted by diffusers' single-file
    converter: the last block's swapped 2-part context modulation and SD3.5's attn2 included."""
    src = onetrainer(F / "sd3_diffusers.safetensors", tmp_path / "ot.safetensors") if lora == "onetrainer" \
        else F / f"sd3_{lora}.safetensors"
    got = merged(SD3[base], src, tmp_path)
    lora = "diffusers" if lora == "onetrainer" else lora
    assert max_diff(got, _sd3_expected(lora, base)) <= 1e-5


@pytest.mark.parametrize("src,to,base", [("kohya", "diffusers", None), ("diffusers", "kohya", None),
                                         ("kohya", "kohya", None), ("kohya", "diffusers", "original"),
                                         ("diffusers", "kohya", "diffusers")])
def test_sd3_convert_is_exact(src, to, base, tmp_path):
    out = tmp_path / "c.safetensors"
    rep = convert(str(F / f"sd3_{src}.safetensors"), to=to, out=out, base=None if base is None else SD3[base])
    assert rep.report["max_abs_diff"] is not None and rep.report["max_abs_diff"] <= 1e-6
    merge(SD3["diffusers"], [str(out)], tmp_path / "o")
    got = folder_weights(tmp_path / "o")
    assert max_diff(got, _sd3_expected(src, "diffusers")) <= 1e-5


def test_flux_and_sd3_are_told_apart(tmp_path):
    """Both name their double-stream attention transformer_blocks.N.attn.to_q in diffusers: the base and the
    family-only modules decide, and a LoRA of one on the other's base is one line naming both."""
    for lora, base, want in (("flux_kohya", SD3["original"], "Flux.1.*SD3"), ("flux_diffusers", SD3["diffusers"],
                              "Flux.1.*SD3"), ("sd3_kohya", BASES["bfl"], "SD3.*Flux.1"),
                             ("sd3_diffusers", BASES["diffusers"], "SD3.*Flux.1")):
        with pytest.raises(BadInputError, match=want) as e:
            merge(base, [str(F / f"{lora}.safetensors")], tmp_path / "o")
        assert "\n" not in str(e.value)
    assert inspect(F / "sd3_diffusers.safetensors").report["family"]["family"] == "sd3"


# ------------------------------------------------------------------------------------------------- text encoders
def test_text_encoder_modules_go_to_the_pipeline_components(tmp_path):
    """sd-scripts' Flux LoRA may train CLIP-L (`lora_te1_`): placed on the diffusers folder's text_encoder
    (forward from its names, with or without transformers' text_model. wrapper); the original single file holds
    the transformer only, so there it is refused (strict) or skipped (--no-strict)."""
    import shutil

    folder = tmp_path / "flux"
    shutil.copytree(BASES["diffusers"], folder)
    shutil.copytree(F.parent / "sd" / "base" / "text_encoder", folder / "text_encoder")  # a CLIP text model
    g = torch.Generator().manual_seed(1)
    lora = load_file(F / "flux_kohya.safetensors")
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 8, generator=g),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(8, 2, generator=g),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0)}
    src = tmp_path / "with_te.safetensors"
    save_file({**lora, **te}, src)
    merge(folder, [str(src)], tmp_path / "o")
    k = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj."
    want = load_file(folder / "text_encoder" / "model.safetensors")["encoder.layers.0.self_attn.q_proj.weight"] + \
        0.5 * te[k + "lora_up.weight"] @ te[k + "lora_down.weight"]
    got = load_file(tmp_path / "o" / "text_encoder" / "model.safetensors")["encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(got, want, atol=1e-6)
    assert max_diff(folder_weights(tmp_path / "o"),
                     _expected("kohya")) <= 1e-5
    with pytest.raises(BadInputError, match="1 module.*not in the base.*lora_te1_"):
        merge(BASES["bfl"], [str(src)], tmp_path / "o2.safetensors")
    code, _, err = run_cli("merge", "--base", BASES["bfl"], "--adapter", src, "--out", tmp_path / "o3.safetensors",
                           "--no-strict")
    assert code == 0, err


def test_a_bare_transformer_folder_is_a_diffusers_base(tmp_path):
    """The transformer/ component folder alone (config.json + diffusion_pytorch_model.safetensors) is a base."""
    merge(BASES["diffusers"] / "transformer", [str(F / "flux_kohya.safetensors")], tmp_path / "o")
    assert max_diff(load_file(tmp_path / "o" / "diffusion_pytorch_model.safetensors"), _expected("kohya")) <= 1e-5


def test_a_fused_lora_of_the_wrong_height_is_refused(tmp_path):
    """A qkv LoRA whose up has rows that are not 3 x its input width (another model's, or cut short) would lose
    rows in a split: refused in one line, nothing written."""
    t = load_file(F / "flux_kohya.safetensors")
    k = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
    t[k] = torch.cat([t[k], torch.ones(5, t[k].shape[1])])
    bad = tmp_path / "bad.safetensors"
    save_file(t, bad)
    for base in ("diffusers", None):
        with pytest.raises(BadInputError, match="img_attn_qkv.*53 output rows.*make 48") as e:
            if base is None:
                convert(str(bad), to="diffusers", out=tmp_path / "c.safetensors")
            else:
                merge(BASES[base], [str(bad)], tmp_path / "o")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c.safetensors").exists()


def test_dora_on_a_fused_qkv_splits_by_rows(tmp_path):
    """Output-axis DoRA normalises each output row on its own, so cutting it with the rows is exact: the merge
    into the diffusers folder equals the merge into the BFL file (one fused DoRA) in diffusers' layout."""
    t = load_file(F / "flux_kohya.safetensors")
    g = torch.Generator().manual_seed(2)
    t["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.rand(48, 1, generator=g) + 0.5
    src = tmp_path / "dora.safetensors"
    save_file(t, src)
    fused = merged(BASES["bfl"], src, tmp_path)
    (tmp_path / "d").mkdir()
    split = _to_bfl(merged(BASES["diffusers"], src, tmp_path / "d"))
    assert max_diff(split, fused) <= 1e-5
    assert not torch.equal(fused["double_blocks.0.img_attn.qkv.weight"],
                           _to_bfl(_expected("kohya"))["double_blocks.0.img_attn.qkv.weight"])


def test_a_diffusers_flux_lora_without_a_base_is_refused_until_told_its_family(tmp_path):
    """Flux.1's diffusers names are HunyuanVideo's and Flux.2's too, and their kohya spellings differ: without a
    base, converting to kohya names is refused naming the families, and `family` (a read option) settles it."""
    out = tmp_path / "k.safetensors"
    with pytest.raises(BadInputError, match=r"Flux\.1.*HunyuanVideo.*family=NAME") as e:
        convert(str(F / "flux_diffusers.safetensors"), to="kohya", out=out)
    assert "\n" not in str(e.value) and not out.exists()
    with pytest.raises(BadInputError, match="family"):
        convert(str(F / "flux_diffusers.safetensors"), to="kohya", out=out, read_options={"family": "nope"})
    rep = convert(str(F / "flux_diffusers.safetensors"), to="kohya", out=out, read_options={"family": "flux"})
    assert rep.report["max_abs_diff"] <= 1e-6 and "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight" in load_file(out)
