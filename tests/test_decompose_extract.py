"""`loraport extract`: a base and (the base merged with a known PEFT LoRA) give that LoRA's ΔW back."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from _decompose_util import (LINEAR_TARGETS, TinyConv, cli, fp32_tol, lora_model, peft_deltas, read_delta,
                                   save_state, tiny_llama)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp / "base")
    pm = lora_model(base, r=8, seed=1, targets=LINEAR_TARGETS)
    ref = peft_deltas(pm)
    tuned = pm.merge_and_unload()
    tuned.save_pretrained(tmp / "tuned")
    return tmp, base, {k: v.detach().clone() for k, v in tuned.state_dict().items()}, ref


@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_extract_recovers_the_merged_rank8_lora(llama_pair, tmp_path, svd):
    tmp, base, tuned_sd, ref = llama_pair
    out = tmp_path / "lora"
    r = cli("extract", "--base", tmp / "base", "--tuned", tmp / "tuned", "--rank", 8, "--svd", svd,
            "--out", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert {x["target"] for x in rep["layers"]} == set(ref)
    assert all(x["rank"] == 8 and x["method"] == svd for x in rep["layers"])
    assert rep["unchanged"] == len(tuned_sd) - len(ref)
    got = read_delta(out, base.state_dict())
    assert set(got) == set(ref)
    for name, d in ref.items():
        err = float((got[name] - d).abs().max())
        assert err <= fp32_tol(d, tuned_sd[name]), (name, err, fp32_tol(d, tuned_sd[name]))
    assert rep["max_rel_error"] < 1e-5


def test_extracted_adapter_loads_and_merges_in_peft(llama_pair, tmp_path):
    from peft import PeftModel

    tmp, base, tuned_sd, ref = llama_pair
    out = tmp_path / "lora"
    assert cli("extract", "--base", tmp / "base", "--tuned", tmp / "tuned", "--rank", 8, "--out", out).exit_code == 0
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).merge_and_unload().state_dict()
    for name, w in tuned_sd.items():
        tol = fp32_tol(ref[name], w) if name in ref else 0.0
        assert float((merged[name] - w).abs().max()) <= tol, name


def test_extract_lower_rank_is_optimal_and_energy_picks_ranks(llama_pair, tmp_path):
    tmp, base, tuned_sd, ref = llama_pair
    r = cli("extract", "--base", tmp / "base", "--tuned", tmp / "tuned", "--rank", 3, "--out", tmp_path / "r3",
            "--json")
    assert r.exit_code == 0, r.output
    for x in json.loads(r.stdout)["layers"]:
        D = tuned_sd[x["target"]].double() - base.state_dict()[x["target"]].double()
        s = torch.linalg.svdvals(D)
        opt = float(s[3:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert x["rel_error"] == pytest.approx(opt, rel=1e-4)
    r = cli("extract", "--base", tmp / "base", "--tuned", tmp / "tuned", "--energy", 0.9, "--out",
            tmp_path / "e90", "--json")
    assert r.exit_code == 0, r.output
    from loraport.decompose import rank_for_energy

    for x in json.loads(r.stdout)["layers"]:
        D = tuned_sd[x["target"]].double() - base.state_dict()[x["target"]].double()
        s = torch.linalg.svdvals(D)
        assert x["rank"] == rank_for_energy(s, 0.9)
        assert x["rel_error"] <= (1 - 0.9) ** 0.5 + 1e-6


def test_extract_conv_layers(tmp_path):
    torch.manual_seed(0)
    base = TinyConv().eval()
    pm = lora_model(base, r=4, seed=2, targets=["conv1", "conv2", "head"])
    ref = peft_deltas(pm)
    save_state(base, tmp_path / "base.safetensors")
    tuned = pm.merge_and_unload()
    save_state(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "lora"
    r = cli("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "tuned.safetensors",
            "--rank", 4, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    got = read_delta(out, base.state_dict())
    assert set(got) == {"conv1.weight", "conv2.weight", "head.weight"}
    for name, d in ref.items():
        assert got[name].shape == d.shape
        assert float((got[name] - d).abs().max()) <= fp32_tol(d, tuned.state_dict()[name]), name


def test_extract_bad_input(llama_pair, tmp_path):
    tmp, *_ = llama_pair
    b, t = tmp / "base", tmp / "tuned"
    cases = [
        (["--rank", 4, "--energy", 0.9], "either --rank or --energy"),
        ([], "--rank N or --energy"),
        (["--rank", 0], "at least 1"),
        (["--energy", 1.5], "(0, 1]"),
    ]
    for extra, msg in cases:
        r = cli("extract", "--base", b, "--tuned", t, "--out", tmp_path / "x", *extra)
        assert r.exit_code == 2 and msg in r.stderr and "Traceback" not in r.output, (extra, r.output)
        assert not (tmp_path / "x").exists()
    r = cli("extract", "--base", tmp_path / "nope", "--tuned", t, "--rank", 4, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("extract", "--base", b, "--tuned", b, "--rank", 4, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "nothing to extract" in r.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))
    (tmp_path / "exists").mkdir()
    r = cli("extract", "--base", b, "--tuned", t, "--rank", 4, "--out", tmp_path / "exists")
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = cli("extract", "--base", b, "--tuned", t, "--rank", 4, "--out", b / "inside")
    assert r.exit_code == 2 and "inside the input" in r.stderr


def test_extract_gpt2_conv1d_and_embedding_round_trip_through_peft(tmp_path):
    """Conv1D weights are stored [in, out] and embedding LoRAs transposed: the extracted adapter must say so
    (fan_in_fan_out, lora_embedding_A/B) for PEFT itself to load and merge it back to the tuned weights."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=1, eos_token_id=2)).eval()
    base.save_pretrained(tmp_path / "base")
    pm = lora_model(base, r=4, seed=1, targets=["c_attn", "c_fc", "wte"], fan_in_fan_out=True)
    ref = peft_deltas(pm)
    tuned = pm.merge_and_unload()
    tuned.save_pretrained(tmp_path / "tuned")
    tsd = tuned.state_dict()
    out = tmp_path / "lora"
    r = cli("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", 4, "--out", out)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    got = peft_deltas(pm2)
    assert set(got) == set(ref) and "transformer.wte.weight" in got
    for name, d in ref.items():
        assert float((got[name] - d).abs().max()) <= fp32_tol(d, tsd[name]), name
    merged = pm2.merge_and_unload().state_dict()
    for name, w in tsd.items():
        src = "transformer.wte.weight" if name == "lm_head.weight" else name  # tied to the embeddings
        tol = fp32_tol(ref[src], w) if src in ref else 0.0
        assert float((merged[name] - w).abs().max()) <= tol, name


def test_extract_to_kohya_from_a_diffusers_unet(tmp_path):
    """--to kohya writes through the kohya writer (names mapped from the base's keys); its reader gives back
    W_tuned − W_base for attention linears, 1×1 and 3×3 convs."""
    from diffusers import UNet2DConditionModel

    from loraport.checkpoint import Checkpoint
    from loraport.formats import load_adapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    g = torch.Generator().manual_seed(1)
    for which in ("base", "tuned"):
        (tmp_path / which).mkdir()
        (tmp_path / which / "model_index.json").write_text(json.dumps(
            {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
        if which == "tuned":  # rank-4 updates on attention, 1x1 and 3x3 conv weights
            with torch.no_grad():
                for n, p in unet.named_parameters():
                    if n.endswith(("attn1.to_q.weight", "attn2.to_k.weight", "conv1.weight", "proj_in.weight")):
                        o, i = p.shape[0], p[0].numel()
                        d = torch.randn(o, 4, generator=g) @ torch.randn(4, i, generator=g) * 0.01
                        p.add_(d.reshape(p.shape))
        unet.save_pretrained(tmp_path / which / "unet")
    out = tmp_path / "lora.safetensors"
    r = cli("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", 4, "--to", "kohya",
            "--out", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    base, tuned = Checkpoint.open(tmp_path / "base"), Checkpoint.open(tmp_path / "tuned")
    ad = load_adapter(out, base=base)
    assert {d.target for d in ad.deltas} == {x["target"] for x in rep["layers"]}
    kinds = {len(x["shape"]) for x in rep["layers"]}
    assert kinds == {2, 4}
    for d in ad.deltas:
        W = base.get(d.target).float()
        want = tuned.get(d.target).float() - W
        got = d.resolve(tuple(W.shape)).contribution(W)
        assert float((got - want).abs().max()) <= fp32_tol(want, tuned.get(d.target).float()), d.target
    r = cli("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", 4, "--to", "kohya",
            "--out", tmp_path / "folder")
    assert r.exit_code == 2 and ".safetensors" in r.stderr


def test_extract_include_exclude(llama_pair, tmp_path):
    tmp, *_ = llama_pair
    r = cli("extract", "--base", tmp / "base", "--tuned", tmp / "tuned", "--rank", 2, "--include", r"self_attn\.",
            "--exclude", "k_proj", "--out", tmp_path / "x", "--json")
    assert r.exit_code == 0, r.output
    names = {x["target"].split(".")[-2] for x in json.loads(r.stdout)["layers"]}
    assert names == {"q_proj", "v_proj", "o_proj"}
    r = cli("extract", "--base", tmp / "base", "--tuned", tmp / "tuned", "--rank", 2, "--include", "(",
            "--out", tmp_path / "y")
    assert r.exit_code == 2 and "regular expression" in r.stderr
