"""diffusers LoRA files (`pytorch_lora_weights.safetensors`) vs diffusers itself: files written by
`save_lora_weights` (PEFT keys + lora_adapter_metadata with rank/alpha patterns), the legacy
attention-processor spelling, DoRA; merged into the diffusers folder and the original single file; the
diffusers writer read back by diffusers."""

from __future__ import annotations

import pytest
import torch

from _sd_util import (apply_adapter, flat_state, max_diff, oracle_fused, peft_lora, pipeline_on_base, run_cli,
                      sd_base, to_single_file)
from loraport.checkpoint import Checkpoint
from loraport.formats import detect, get_format, load_adapter
from loraport.safetensors_io import SafetensorsFile, save_file

TOL = 1e-5


def _cfg(c):
    return {a: (sorted(b) if isinstance(b, set) else b) for a, b in c.to_dict().items()}


def _save(pipe, folder, sds, cfgs, xl=False):
    kw = {"unet_lora_layers": sds["unet"], "text_encoder_lora_layers": sds["text_encoder"],
          "unet_lora_adapter_metadata": _cfg(cfgs["unet"]),
          "text_encoder_lora_adapter_metadata": _cfg(cfgs["text_encoder"])}
    if xl:
        kw.update(text_encoder_2_lora_layers=sds["text_encoder_2"],
                  text_encoder_2_lora_adapter_metadata=_cfg(cfgs["text_encoder_2"]))
    type(pipe).save_lora_weights(folder, **kw)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def patterned(tmp_path_factory):
    """SD1: ranks 4/2/3 and alphas 8/3/5 via rank_pattern/alpha_pattern, in diffusers' own file."""
    tmp = tmp_path_factory.mktemp("dif")
    pipe = pipeline_on_base(False)
    sds, cfgs = peft_lora(pipe, r=4, alpha=8, rank_pattern={"to_k": 2, "conv1": 3, "fc2": 2},
                          alpha_pattern={"to_v": 3, "fc1": 5})
    f = _save(pipe, tmp / "lora", sds, cfgs)
    folder, single, base = sd_base(False)
    return tmp, f, base, oracle_fused(folder, f)


def test_detect_and_read_folder(patterned):
    tmp, f, base, fused = patterned
    assert detect(tmp / "lora").name == "diffusers" and detect(f).name == "diffusers"
    ck = Checkpoint.open(sd_base(False)[0])
    ad = load_adapter(tmp / "lora", base=ck)
    assert any("lora_adapter_metadata" in n for n in ad.notes)
    assert {d.rank() for d in ad.deltas} == {2, 3, 4}
    merged = apply_adapter(ad, ck)
    changed = sorted(k for k in fused if not torch.equal(fused[k], base[k]))
    assert sorted(merged) == changed
    assert max_diff(merged, fused, changed) <= TOL


def test_into_single_file(patterned):
    tmp, f, base, fused = patterned
    ck = Checkpoint.open(sd_base(False)[1])
    ad = load_adapter(f, base=ck)
    assert all(d.target.startswith(("model.diffusion_model.", "cond_stage_model.")) for d in ad.deltas)
    merged = apply_adapter(ad, ck)
    assert max_diff(merged, to_single_file(fused, xl=False), list(merged)) <= TOL


def test_writer_read_by_diffusers(patterned, tmp_path):
    """diffusers writer, from an adapter resolved against the single file: diffusers fuses it to the same
    weights; per-target ΔW survives the round trip."""
    tmp, f, base, fused = patterned
    folder, single, _ = sd_base(False)
    ck1 = Checkpoint.open(single)
    ad = load_adapter(f, base=ck1)
    out = tmp_path / "w.safetensors"
    get_format("diffusers").write(ad, out, base=ck1)
    assert max_diff(oracle_fused(folder, out), fused) <= TOL
    back = load_adapter(out, base=ck1)
    by_t = {d.target: d for d in back.deltas}
    for d in ad.deltas:
        W = ck1.get(d.target).float()
        a = d.resolve(tuple(W.shape)).contribution(W)
        assert (a - by_t[d.target].resolve(tuple(W.shape)).contribution(W)).abs().max().item() <= 1e-6


def test_kohya_writer_read_by_diffusers(patterned, tmp_path):
    """kohya writer: diffusers' kohya loader keeps only the most common alpha when alphas differ per module
    (peer quirk, see formats/kohya.md), so the oracle check uses baked scales on a uniform-rank adapter."""
    folder, single, base = sd_base(False)
    pipe = pipeline_on_base(False)
    sds, cfgs = peft_lora(pipe, r=4, alpha=6, seed=9)
    f = _save(pipe, tmp_path / "lora", sds, cfgs)
    fused = oracle_fused(folder, f)
    ck = Checkpoint.open(folder)
    out = tmp_path / "k.safetensors"
    get_format("kohya").write(load_adapter(f, base=ck), out, base=ck)
    assert detect(out).name == "kohya"
    assert max_diff(oracle_fused(folder, out), fused) <= TOL


def _legacy(sds: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The pre-PEFT diffusers spelling, from diffusers' own key table (UNET_TO_DIFFUSERS read backwards for the
    UNet attention processors; convert_state_dict_to_diffusers for the text encoder's lora_linear_layer)."""
    from diffusers.utils.state_dict_utils import UNET_TO_DIFFUSERS, convert_state_dict_to_diffusers

    back = {v: k for k, v in UNET_TO_DIFFUSERS.items() if "_lora." in k}
    out = {}
    for k, v in sds["unet"].items():
        for peft, old in sorted(back.items(), key=lambda kv: -len(kv[0])):
            if peft + ".weight" in k:
                mod = k[: k.index(peft + ".weight")]
                out[f"unet.{mod}.processor{old}.weight"] = v
                break
    te = convert_state_dict_to_diffusers(sds["text_encoder"])
    out.update({f"text_encoder.{k}": v for k, v in te.items()})
    return {k: v.contiguous() for k, v in out.items()}


def test_legacy_attention_processor_form(tmp_path):
    folder, single, base = sd_base(False)
    pipe = pipeline_on_base(False)
    from peft import LoraConfig

    sds, _ = peft_lora(pipe, r=4, alpha=4, seed=11)
    unet_attn = {k: v for k, v in sds["unet"].items() if any(f".{p}.lora_" in k for p in ("to_q", "to_k", "to_v",
                                                                                           "to_out.0"))}
    leg = _legacy({"unet": unet_attn, "text_encoder": sds["text_encoder"]})
    assert any(".processor.to_q_lora.down.weight" in k for k in leg)
    assert any(".lora_linear_layer.up.weight" in k for k in leg)
    save_file(leg, tmp_path / "legacy.safetensors")
    fused = oracle_fused(folder, tmp_path / "legacy.safetensors")
    ck = Checkpoint.open(folder)
    ad = load_adapter(tmp_path / "legacy.safetensors", base=ck)
    assert ad.format == "diffusers"
    assert any(n.startswith("legacy spelling") for n in ad.notes) and any("scale 1" in n for n in ad.notes)
    merged = apply_adapter(ad, ck)
    changed = sorted(k for k in fused if not torch.equal(fused[k], base[k]))
    assert sorted(merged) == changed
    assert max_diff(merged, fused, changed) <= TOL
    assert LoraConfig  # PEFT made the factors


def test_dora(tmp_path):
    folder, single, base = sd_base(False)
    pipe = pipeline_on_base(False)
    # UNet only: this transformers/diffusers pair does not load DoRA magnitudes into the CLIP text encoder
    sds, cfgs = peft_lora(pipe, r=4, alpha=8, seed=13, use_dora=True, te=False)
    assert any("lora_magnitude_vector" in k for k in sds["unet"])
    f = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    type(pipe).save_lora_weights(f.parent, unet_lora_layers=sds["unet"], unet_lora_adapter_metadata=_cfg(cfgs["unet"]))
    fused = oracle_fused(folder, f)
    ck = Checkpoint.open(folder)
    ad = load_adapter(f, base=ck)
    assert any("DoRA" in n for n in ad.notes)
    merged = apply_adapter(ad, ck)
    assert max_diff(merged, fused, list(merged)) <= TOL
    out = tmp_path / "w.safetensors"
    get_format("diffusers").write(ad, out, base=ck)
    assert max_diff(oracle_fused(folder, out), fused) <= TOL
    # kohya keeps DoRA as dora_scale [out, 1]; it reads back to the same weights
    get_format("kohya").write(ad, tmp_path / "k.safetensors", base=ck)
    keys = SafetensorsFile(tmp_path / "k.safetensors").tensors
    assert any(k.endswith(".dora_scale") for k in keys)
    back = apply_adapter(load_adapter(tmp_path / "k.safetensors", base=ck), ck)
    assert max_diff(back, fused, list(back)) <= 2e-5  # LyCORIS adds eps to the norm


def test_sdxl_three_components_into_single_file(tmp_path):
    folder, single, base = sd_base(True)
    pipe = pipeline_on_base(True)
    sds, cfgs = peft_lora(pipe, r=4, alpha=8, seed=17)
    f = _save(pipe, tmp_path / "lora", sds, cfgs, xl=True)
    fused = oracle_fused(folder, f, xl=True)
    ck = Checkpoint.open(single)
    ad = load_adapter(f, base=ck)
    assert any(d.rows for d in ad.deltas)
    merged = apply_adapter(ad, ck)
    assert max_diff(merged, to_single_file(fused, xl=True), list(merged)) <= TOL


def test_cli_merge_and_inspect_free_errors(patterned, tmp_path):
    tmp, f, base, fused = patterned
    code, _, err = run_cli("merge", "--base", sd_base(False)[1], "--adapter", f, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    got = SafetensorsFile(tmp_path / "m.safetensors").load_all()
    assert max_diff(got, to_single_file(fused, xl=False)) <= TOL
    flat = flat_state(pipeline_on_base(False))
    assert flat.keys() == base.keys()


def test_convert_to_kohya_without_base(patterned, tmp_path):
    """Without a base, diffusers-named targets are flattened forward (CLIP in the text_model_ spelling); read
    back against the base, the file gives the same weights as diffusers fused from the original."""
    tmp, f, base, fused = patterned
    code, out, err = run_cli("convert", f, "--to", "kohya", "--out", tmp_path / "k.safetensors")
    assert code == 0, err
    keys = SafetensorsFile(tmp_path / "k.safetensors").tensors
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    ck = Checkpoint.open(sd_base(False)[0])
    merged = apply_adapter(load_adapter(tmp_path / "k.safetensors", base=ck), ck)
    assert max_diff(merged, fused, list(merged)) <= TOL
