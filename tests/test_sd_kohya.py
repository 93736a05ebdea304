"""kohya single-file LoRA vs diffusers as the oracle, on tiny SD1.x- and SDXL-shaped pipelines.

The LoRA is made by PEFT on the diffusers UNet / CLIP text encoders and converted to kohya form by diffusers'
own `convert_state_dict_to_kohya`; the oracle is diffusers `load_lora_weights` + `fuse_lora` of that file.
loraport merges the same file into the diffusers folder and into an original-layout single file (LDM/SGM
UNet names, CLIP / fused OpenCLIP text encoders)."""

from __future__ import annotations

import json
import pytest
import torch

from _sd_util import (apply_adapter, flat_state, max_diff, oracle_fused, peft_lora, pipeline_on_base, run_cli,
                      sd_base, to_kohya_with_diffusers, to_single_file, unet_name_maps)
from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError
from loraport.formats import detect, get_format, load_adapter
from loraport.names.sd import kohya_name, layout_from_diffusers
from loraport.safetensors_io import SafetensorsFile, save_file

TOL = 1e-5


def _make(tmp, xl: bool, sgm: bool, **lora):
    folder, single, base = sd_base(xl)
    sds, _ = peft_lora(pipeline_on_base(xl), **lora)
    k = to_kohya_with_diffusers(sds)
    if sgm:  # SDXL kohya files name the UNet in SGM (LDM) form
        unet = {n[5:] for n in base if n.startswith("unet.")}
        to_ldm, _ = unet_name_maps(layout_from_diffusers(unet))
        ren = {kohya_name("lora_unet", n.rsplit(".", 1)[0]): kohya_name("lora_unet", to_ldm(n).rsplit(".", 1)[0])
               for n in unet}
        k = {ren.get(a.split(".", 1)[0], a.split(".", 1)[0]) + "." + a.split(".", 1)[1]: v for a, v in k.items()}
    save_file(k, tmp / "lora.safetensors")
    (tmp / "base").symlink_to(folder)
    (tmp / "single.safetensors").symlink_to(single)
    fused = oracle_fused(folder, tmp / "lora.safetensors", xl)
    return base, fused


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1")
    base, fused = _make(tmp, xl=False, sgm=False)
    return tmp, base, fused


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    base, fused = _make(tmp, xl=True, sgm=True)
    return tmp, base, fused


def _changed(base, fused):
    return sorted(k for k in fused if not torch.equal(fused[k], base[k]))


# the real UNet configs (SD 1.5: 4 levels, attention in the first three; SDXL: 3 levels, 2/10 transformer layers,
# text_time embedding), built on the meta device: names and shapes only
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=128)


@pytest.mark.parametrize("cfg", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_name_table_matches_diffusers_ldm_converter(cfg):
    """loraport.names.sd's diffusers→LDM UNet map, checked by diffusers' own LDM→diffusers converter on the
    real SD 1.5 and SDXL UNet layouts."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    sd = unet.state_dict()
    to_ldm, to_dif = unet_name_maps(layout_from_diffusers(sd))
    ldm = {"model.diffusion_model." + to_ldm(k): v for k, v in sd.items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd)
    assert all(back[k].shape == sd[k].shape for k in sd)
    assert all(to_dif(to_ldm(k)) == k for k in sd)
    # the index built from either naming gives every UNet tensor one kohya name in each spelling
    from loraport.names.sd import SDNames

    a = SDNames(["unet." + k for k in sd], None)
    b = SDNames(list(ldm), None)
    assert set(a.by_kohya) == set(b.by_kohya)
    assert len({e.sgm for e in a.entries}) == len({k.rsplit(".", 1)[0] for k in sd})


def test_openclip_table_matches_diffusers_converter():
    """SDXL text encoder 2 in OpenCLIP layout (fused in_proj) converts back with diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from _sd_util import openclip_from_hf, tiny_te

    te = tiny_te(32, proj=True, seed=4)
    sd = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
          for k, v in te.state_dict().items()}
    oc = openclip_from_hf(sd, "conditioner.embedders.1.model.")
    oc["conditioner.embedders.1.model.positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    try:
        model = convert_open_clip_checkpoint(te, oc, prefix="conditioner.embedders.1.model.")
    except Exception as e:  # noqa: BLE001 - converter API differences across diffusers versions
        pytest.skip(f"diffusers' OpenCLIP converter unavailable here: {e}")
    got = model.state_dict() if hasattr(model, "state_dict") else model
    ref = te.state_dict()
    common = [k for k in ref if k in got and "position_ids" not in k]
    assert len(common) >= len([k for k in ref if "position_ids" not in k]) - 1
    assert all(torch.equal(got[k].float(), ref[k].float()) for k in common)


def test_sd1_kohya_into_diffusers_folder(sd1):
    tmp, base, fused = sd1
    ck = Checkpoint.open(tmp / "base")
    assert detect(tmp / "lora.safetensors").name == "kohya"
    ad = load_adapter(tmp / "lora.safetensors", base=ck)
    merged = apply_adapter(ad, ck)
    assert sorted(merged) == _changed(base, fused)  # same tensors touched as diffusers
    assert max_diff(merged, fused, list(merged)) <= TOL
    assert any(d.A.dim() == 4 for d in ad.deltas)  # conv LoCon present
    assert "UNet names: diffusers" in ad.notes


def test_sd1_kohya_into_single_file(sd1):
    tmp, base, fused = sd1
    ck = Checkpoint.open(tmp / "single.safetensors")
    ad = load_adapter(tmp / "lora.safetensors", base=ck)
    assert all(d.target.startswith(("model.diffusion_model.", "cond_stage_model.transformer.")) for d in ad.deltas)
    merged = apply_adapter(ad, ck)
    ref = to_single_file(fused, xl=False)
    assert len(merged) == len(_changed(base, fused))
    assert max_diff(merged, ref, list(merged)) <= TOL


def test_sdxl_sgm_kohya_into_folder_and_single_file(sdxl):
    tmp, base, fused = sdxl
    changed = _changed(base, fused)
    ck = Checkpoint.open(tmp / "base")
    ad = load_adapter(tmp / "lora.safetensors", base=ck)
    assert any("SGM" in n for n in ad.notes)
    merged = apply_adapter(ad, ck)
    assert sorted(merged) == changed
    assert max_diff(merged, fused, changed) <= TOL
    ck1 = Checkpoint.open(tmp / "single.safetensors")
    ad1 = load_adapter(tmp / "lora.safetensors", base=ck1)
    sliced = [d for d in ad1.deltas if d.rows is not None]
    assert sliced and all(d.target.endswith("attn.in_proj_weight") for d in sliced)  # TE2 q/k/v → row thirds
    assert any("row slices" in n for n in ad1.notes)
    merged1 = apply_adapter(ad1, ck1)
    ref = to_single_file(fused, xl=True)
    assert max_diff(merged1, ref, list(merged1)) <= TOL
    changed_single = {k for k in ref if not torch.equal(ref[k], to_single_file(base, xl=True)[k])}
    assert set(merged1) == changed_single


def test_missing_alpha_means_scale_one(sd1, tmp_path):
    tmp, base, _ = sd1
    sf = SafetensorsFile(tmp / "lora.safetensors")
    t = {k: v for k, v in sf.load_all().items() if not k.endswith(".alpha")}
    save_file(t, tmp_path / "noalpha.safetensors")
    ck = Checkpoint.open(tmp / "base")
    ad = load_adapter(tmp_path / "noalpha.safetensors", base=ck)
    assert any(n.startswith("alpha missing on") and n.endswith("scale 1") for n in ad.notes)
    assert all(d.scale == 1.0 for d in ad.deltas)
    # and diffusers agrees (it reads a kohya file without alphas at scale 1 as well)
    fused = oracle_fused(tmp / "base", tmp_path / "noalpha.safetensors")
    merged = apply_adapter(ad, ck)
    assert max_diff(merged, fused, list(merged)) <= TOL


def test_strict_and_no_strict(sd1, tmp_path):
    tmp, _, _ = sd1
    t = SafetensorsFile(tmp / "lora.safetensors").load_all()
    t["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 4)
    t["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(4, 2)
    t["something_else.weight"] = torch.zeros(3)
    save_file(t, tmp_path / "mixed.safetensors")
    ck = Checkpoint.open(tmp / "base")
    with pytest.raises(BadInputError) as ei:
        load_adapter(tmp_path / "mixed.safetensors", base=ck)
    msg = str(ei.value)
    assert "recognised" in msg and "something_else.weight" in msg and "lora_unet_not_a_module" in msg
    assert "\n" not in msg
    ad = load_adapter(tmp_path / "mixed.safetensors", base=ck, strict=False)
    assert "something_else.weight" in ad.metadata["skipped"]
    assert any(n.startswith("skipped") for n in ad.notes)
    assert len(ad.deltas) == len(load_adapter(tmp / "lora.safetensors", base=ck).deltas)


def test_not_kohya_is_refused(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(BadInputError):
        get_format("kohya").read(tmp_path / "x.safetensors")


def _rank_alpha_adapter(tmp):
    """A PEFT LoRA with mixed ranks and alphas, read through the diffusers format (its scale rules)."""
    pipe = pipeline_on_base(False)
    sds, cfgs = peft_lora(pipe, r=4, alpha=8, rank_pattern={"to_k": 2, "conv1": 3}, alpha_pattern={"to_v": 3})
    type(pipe).save_lora_weights(tmp / "lora", unet_lora_layers=sds["unet"],
                                 text_encoder_lora_layers=sds["text_encoder"],
                                 unet_lora_adapter_metadata=_cfg(cfgs["unet"]),
                                 text_encoder_lora_adapter_metadata=_cfg(cfgs["text_encoder"]))
    return Checkpoint.open(sd_base(False)[0])


def _cfg(c):
    return {a: (sorted(b) if isinstance(b, set) else b) for a, b in c.to_dict().items()}


@pytest.mark.parametrize("bake", [False, True])
def test_kohya_writer_round_trip_per_target(tmp_path, bake):
    ck = _rank_alpha_adapter(tmp_path)
    src = load_adapter(tmp_path / "lora", base=ck)
    get_format("kohya").write(src, tmp_path / "k.safetensors", base=ck, bake=bake)
    back = load_adapter(tmp_path / "k.safetensors", base=ck)
    assert back.format == "kohya"
    by_t = {d.target: d for d in back.deltas}
    assert set(by_t) == {d.target for d in src.deltas}
    for d in src.deltas:
        W = ck.get(d.target).float()
        a = d.resolve(tuple(W.shape)).contribution(W)
        b = by_t[d.target].resolve(tuple(W.shape)).contribution(W)
        assert (a - b).abs().max().item() <= 1e-6, d.target
    keys = SafetensorsFile(tmp_path / "k.safetensors").tensors
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any("text_model_encoder" in k for k in keys)  # the ecosystem's CLIP spelling


def test_kohya_writer_sdxl_sgm_and_fused_rows(sdxl, tmp_path):
    """From a single-file SDXL base (fused OpenCLIP in_proj): writes SGM UNet names and te2 q/k/v, which
    diffusers loads back to the same fused weights."""
    tmp, base, fused = sdxl
    ck1 = Checkpoint.open(tmp / "single.safetensors")
    ad = load_adapter(tmp / "lora.safetensors", base=ck1)
    get_format("kohya").write(ad, tmp_path / "k.safetensors", base=ck1)
    keys = list(SafetensorsFile(tmp_path / "k.safetensors").tensors)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    again = oracle_fused(tmp / "base", tmp_path / "k.safetensors", xl=True)
    assert max_diff(again, fused) <= TOL


def test_cli_merge_kohya(sd1, tmp_path):
    """`loraport merge` of the kohya file: into the diffusers folder (loaded back by diffusers) and into the
    single-file checkpoint."""
    tmp, base, fused = sd1
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli("merge", "--base", tmp / "base", "--adapter", tmp / "lora.safetensors",
                                   "--out", out, "--json")
    assert code == 0, stderr[-2000:]
    rep = json.loads(stdout)
    assert rep["adapters"][0]["format"] == "kohya"
    from _sd_util import load_pipeline

    got = flat_state(load_pipeline(out))
    assert max_diff(got, fused) <= TOL
    out1 = tmp_path / "merged.safetensors"
    code, _, stderr = run_cli("merge", "--base", tmp / "single.safetensors", "--adapter", tmp / "lora.safetensors",
                              "--out", out1)
    assert code == 0, stderr[-2000:]
    got1 = SafetensorsFile(out1).load_all()
    ref = to_single_file(fused, xl=False)
    assert max_diff(got1, ref) <= TOL


def test_cli_merge_wrong_base_is_one_line(sd1, sdxl, tmp_path):
    tmp1, _, _ = sd1
    tmpx, _, _ = sdxl
    code, _, stderr = run_cli("merge", "--base", tmp1 / "base", "--adapter", tmpx / "lora.safetensors",
                              "--out", tmp_path / "o")
    assert code == 2
    assert "Traceback" not in stderr and "not in the base" in stderr and stderr.count("\n") <= 1
    assert not (tmp_path / "o").exists()


def test_sd_scripts_text_encoder_spelling(sd1, tmp_path):
    """sd-scripts names the SD1 text encoder `lora_te_text_model_…` (diffusers' converter writes `lora_te1_…`
    without `text_model_` for a transformers-5 CLIP); both land on the same tensors, as in diffusers."""
    tmp, base, fused = sd1
    t = SafetensorsFile(tmp / "lora.safetensors").load_all()
    ren = {(k.replace("lora_te1_", "lora_te_text_model_", 1) if k.startswith("lora_te1_") else k): v
           for k, v in t.items()}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in ren)
    save_file(ren, tmp_path / "sdscripts.safetensors")
    for b in (tmp / "base", tmp / "single.safetensors"):
        ck = Checkpoint.open(b)
        merged = apply_adapter(load_adapter(tmp_path / "sdscripts.safetensors", base=ck), ck)
        ref = fused if b.name == "base" else to_single_file(fused, xl=False)
        assert max_diff(merged, ref, list(merged)) <= TOL
        assert len(merged) == len(_changed(base, fused))


def test_inspect_without_base_names_format_and_quirks(sd1):
    tmp, _, _ = sd1
    code, out, err = run_cli("inspect", tmp / "lora.safetensors", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["format"] == "kohya"
    assert any("no base given" in n for n in rep["notes"])
    # targets are grouped by kind without their block numbers (not one entry per layer), and add up
    kinds = rep["target_modules"]
    assert sum(kinds.values()) == rep["targets"] and len(kinds) < rep["targets"]
    assert max(kinds.values()) > 1 and all(k.split(" ")[0] in ("unet", "te", "te1", "te2") for k in kinds)
    code, out, err = run_cli("inspect", tmp / "lora.safetensors", "--base", tmp / "single.safetensors", "--json")
    assert code == 0, err
    assert "UNet names: diffusers" in json.loads(out)["notes"]


def test_sd2_layout_openclip_text_encoder(sd1, tmp_path):
    """SD2.x single files keep the text encoder in OpenCLIP layout (cond_stage_model.model., fused in_proj);
    `lora_te_` q/k/v then land in row thirds, as for SDXL's second encoder."""
    tmp, base, fused = sd1
    sf = to_single_file(base, xl=False, family="sd2")
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") for k in sf)
    save_file({k: v.contiguous() for k, v in sf.items()}, tmp_path / "sd2.safetensors")
    ck = Checkpoint.open(tmp_path / "sd2.safetensors")
    ad = load_adapter(tmp / "lora.safetensors", base=ck)
    assert any(d.rows for d in ad.deltas)
    merged = apply_adapter(ad, ck)
    ref = to_single_file(fused, xl=False, family="sd2")
    assert max_diff(merged, ref, list(merged)) <= TOL
    changed = {k for k in ref if not torch.equal(ref[k], sf[k])}
    assert set(merged) == changed


def test_sdxl_text_projection_is_transposed_in_single_file(sdxl, tmp_path):
    """OpenCLIP stores text_projection as x @ P (transposed vs the HF Linear): a `lora_te2_text_projection`
    LoRA lands transposed in the single file and as is in the diffusers folder."""
    tmp, base, _ = sdxl
    torch.manual_seed(0)
    w = base["text_encoder_2.text_projection.weight"]
    t = {"lora_te2_text_projection.lora_down.weight": torch.randn(2, w.shape[1]),
         "lora_te2_text_projection.lora_up.weight": torch.randn(w.shape[0], 2),
         "lora_te2_text_projection.alpha": torch.tensor(1.0)}
    save_file(t, tmp_path / "proj.safetensors")
    folder = apply_adapter(load_adapter(tmp_path / "proj.safetensors", base=Checkpoint.open(tmp / "base")),
                           Checkpoint.open(tmp / "base"))
    ck1 = Checkpoint.open(tmp / "single.safetensors")
    single = apply_adapter(load_adapter(tmp_path / "proj.safetensors", base=ck1), ck1)
    up, down = t["lora_te2_text_projection.lora_up.weight"], t["lora_te2_text_projection.lora_down.weight"]
    want = w.float() + 0.5 * up @ down  # alpha 1 / rank 2
    assert (folder["text_encoder_2.text_projection.weight"] - want).abs().max() <= 1e-5
    assert (single["conditioner.embedders.1.model.text_projection"] - want.t()).abs().max() <= 1e-5
