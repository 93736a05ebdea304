"""LyCORIS files made live by lycoris-lora on the tiny SD1 pipeline: loraport's merged weight W' must give the
module's own forward output (W' x = LyCORIS forward(x)); writer round trips; what cannot be expressed is
refused with a message; inspect/convert/merge from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _sd_util import apply_adapter, load_pipeline, run_cli, wrapped_module_errors
from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError
from loraport.formats import detect, get_format, load_adapter
from loraport.safetensors_io import SafetensorsFile

SD = Path(__file__).resolve().parent.parent / "fixtures" / "sd"
PRESET = (Path(__file__).resolve().parent.parent / "fixtures" / "makers" / "sd.py")

CASES = [
    ("loha", {"use_tucker": True, "dora_wd": True, "wd_on_output": False}),
    ("lokr", {"factor": 4, "decompose_both": True, "use_tucker": True, "dora_wd": True}),
    ("lokr", {"full_matrix": True}),
    ("locon", {"rs_lora": True}),
    ("loha", {"rs_lora": True}),
    ("full", {}),
]


def _network(pipe, tmp: Path, algo: str, kw: dict):
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    import importlib.util

    spec = importlib.util.spec_from_file_location("sd_maker", PRESET)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    (tmp / "preset.toml").write_text(maker.PRESET)  # the "full" preset lists time_embedding twice on SD UNets
    torch.manual_seed(7)
    net = lycoris_kohya.create_network(1.0, 4, 3, None, pipe.text_encoder, pipe.unet, algo=algo, conv_dim=4,
                                       conv_alpha=2, preset=str(tmp / "preset.toml"), **kw)
    net.apply_to(pipe.text_encoder, pipe.unet, True, True)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p)) if "dora_scale" in n else p.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("algo,kw", CASES, ids=[f"{a}-{'-'.join(k) or 'plain'}" for a, k in CASES])
def test_forward_matches_lycoris(tmp_path, algo, kw):
    folder = SD / "base"  # the micro SD1 pipeline: every module kind, few parameters
    pipe = load_pipeline(folder)
    net = _network(pipe, tmp_path, algo, kw)
    f = tmp_path / "net.safetensors"
    net.save_weights(str(f), torch.float32, None)
    ck = Checkpoint.open(folder)
    ad = load_adapter(f, base=ck)
    merged = apply_adapter(ad, ck)
    target = {d.source_key: d.target for d in ad.deltas}
    worst, n = 0.0, 0
    for lo in net.unet_loras + net.text_encoder_loras:
        org = lo.org_module[0]
        tgt = target[lo.lora_name]
        bname = tgt[: -len(".weight")] + ".bias"
        b = merged[bname] if bname in merged else (ck.get(bname).float() if bname in ck else None)
        W = merged[tgt].reshape(ck.info(tgt).shape)
        if isinstance(org, torch.nn.Conv2d):
            x = torch.randn(1, org.in_channels, 5, 5)
            got = F.conv2d(x, W, b, org.stride, org.padding, org.dilation, org.groups)
        else:
            x = torch.randn(2, org.in_features)
            got = F.linear(x, W, b)
        with torch.no_grad():
            y = lo(x)
        worst = max(worst, ((got - y).abs().max() / y.abs().max()).item())
        n += 1
    assert n == len([k for k in target if not k.endswith(".diff_b")]) and n > 50
    assert worst <= 3e-6
    if kw.get("full_matrix"):
        assert any("full w1 and w2: scale 1" in x for x in ad.notes)
    if kw.get("wd_on_output") is False:
        assert any("DoRA on the input axis" in x for x in ad.notes)


@pytest.mark.parametrize("case", sorted(p.stem[len("lycoris_"):] for p in SD.glob("lycoris_*.safetensors")))
def test_writer_round_trip(tmp_path, case):
    base = Checkpoint.open(SD / "base")
    src = load_adapter(SD / f"lycoris_{case}.safetensors", base=base)
    fmt = src.format
    get_format(fmt).write(src, tmp_path / "w.safetensors", base=base)
    back = load_adapter(tmp_path / "w.safetensors", base=base)
    assert back.kinds() == src.kinds()
    by = {(d.target, d.rows): d for d in back.deltas}
    for d in src.deltas:
        W = base.get(d.target).float()
        a = d.resolve(tuple(W.shape)).contribution(W)
        b = by[(d.target, d.rows)].resolve(tuple(W.shape)).contribution(W)
        assert (a - b).abs().max().item() <= 1e-6, d.target
    # and without a base: names kept, still the same file content
    nobase = load_adapter(tmp_path / "w.safetensors")
    assert any("no base given" in n for n in nobase.notes)
    get_format(fmt).write(nobase, tmp_path / "w2.safetensors")
    assert set(SafetensorsFile(tmp_path / "w2.safetensors").tensors) == set(
        SafetensorsFile(tmp_path / "w.safetensors").tensors)


def test_loha_into_diffusers_is_refused(tmp_path):
    base = Checkpoint.open(SD / "base")
    ad = load_adapter(SD / "lycoris_loha.safetensors", base=base)
    with pytest.raises(BadInputError, match="loha updates have no diffusers"):
        get_format("diffusers").write(ad, tmp_path / "x.safetensors", base=base)


def test_cli_inspect_convert_merge(tmp_path):
    f = SD / "lycoris_lokr_full.safetensors"
    assert detect(f).name == "lycoris"
    code, out, err = run_cli("inspect", f, "--base", SD / "base", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["format"] == "lycoris" and "lokr" in rep["kinds"]
    assert any("scale 1" in n for n in rep["notes"])
    code, out, err = run_cli("convert", SD / "kohya_peft.safetensors", "--to", "diffusers", "--out",
                             tmp_path / "d.safetensors", "--base", SD / "base", "--json")
    assert code == 0, err
    assert json.loads(out)["max_abs_diff"] <= 1e-6
    code, _, err = run_cli("merge", "--base", SD / "base", "--adapter", SD / "lycoris_loha_dora_out.safetensors",
                           "--out", tmp_path / "m")
    assert code == 0, err
    ck = Checkpoint.open(SD / "base")
    want = apply_adapter(load_adapter(SD / "lycoris_loha_dora_out.safetensors", base=ck), ck)
    got = Checkpoint.open(tmp_path / "m")
    assert max((got.get(k).float() - v).abs().max().item() for k, v in want.items()) <= 1e-6


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_both_axes(tmp_path, on_input):
    """IA³ on a Linear and a Conv2d, trained on the output or the input channels (LyCORIS `on_input`)."""
    ia3 = pytest.importorskip("lycoris.modules.ia3")
    from loraport.safetensors_io import save_file

    pipe = load_pipeline(SD / "base")
    mods = {"lora_te_encoder_layers_0_mlp_fc1": pipe.text_encoder.get_submodule("encoder.layers.0.mlp.fc1"),
            "lora_unet_conv_in": pipe.unet.conv_in}
    torch.manual_seed(3)
    tensors, xs = {}, {}
    for name, org in mods.items():
        m = ia3.IA3Module(name, org, 1.0, train_on_input=on_input)
        with torch.no_grad():
            m.weight.normal_(0, 0.5)
        m.apply_to()
        x = torch.randn(1, org.in_channels, 4, 4) if isinstance(org, torch.nn.Conv2d) else torch.randn(3, 8)
        with torch.no_grad():
            xs[name] = (x, org(x))
        tensors.update({f"{name}.{k}": v for k, v in m.state_dict().items() if k in ("weight", "on_input")})
    save_file(tensors, tmp_path / "ia3.safetensors")
    ck = Checkpoint.open(SD / "base")
    ad = load_adapter(tmp_path / "ia3.safetensors", base=ck)
    assert ad.format == "lycoris" and ad.kinds() == ["ia3"]
    merged = apply_adapter(ad, ck)
    for d in ad.deltas:
        org = mods[d.source_key]
        x, y = xs[d.source_key]
        W = merged[d.target]
        got = (F.conv2d(x, W, org.bias, org.stride, org.padding) if isinstance(org, torch.nn.Conv2d)
               else F.linear(x, W, org.bias))
        assert (got - y).abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["loha_tucker", "lokr_tucker", "loha_dora_out", "locon_tucker_dora_in", "ia3"])
def test_cuda_matches_cpu(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base = Checkpoint.open(SD / "base")
    ad = load_adapter(SD / f"lycoris_{case}.safetensors", base=base)
    for d in ad.deltas:
        W = base.get(d.target).float()
        r = d.resolve(tuple(W.shape))
        cpu = r.contribution(W)
        gpu = r.contribution(W.cuda()).cpu()
        assert (cpu - gpu).abs().max().item() <= 1e-5 * max(1.0, cpu.abs().max().item())


def test_standalone_wrapper_lycoris_prefix(tmp_path):
    """lycoris.create_lycoris (the standalone wrapper SimpleTuner uses) names modules `lycoris_<path>`."""
    lycoris = pytest.importorskip("lycoris")
    pipe = load_pipeline(SD / "base")
    torch.manual_seed(5)
    net = lycoris.create_lycoris(pipe.unet, 1.0, linear_dim=4, linear_alpha=2.0, algo="loha")
    net.apply_to()
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.normal_(0, 0.3)
    f = tmp_path / "wrap.safetensors"
    net.save_weights(str(f), torch.float32, None)
    assert detect(f).name == "lycoris"
    ck = Checkpoint.open(SD / "base")
    ad = load_adapter(f, base=ck)
    merged = apply_adapter(ad, ck)
    target = {d.source_key: d.target for d in ad.deltas}
    assert all(k.startswith("lycoris_") for k in target) and len(target) == len(net.loras) > 20
    for name, err in wrapped_module_errors(net, merged, target).items():
        assert err <= 3e-6, name
