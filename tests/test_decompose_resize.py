"""`loraport resize`: lossless at full rank, Eckart–Young optimal below it, DoRA magnitudes kept; the output
loads and merges in PEFT itself."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from _decompose_util import TinyConv, cli, fp32_tol, lora_model, peft_deltas, read_delta, tiny_llama
from loraport.decompose import rank_for_energy

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resize")
    base = tiny_llama(seed=0)
    pm = lora_model(base, r=8, seed=3, targets=TARGETS, alpha=16)
    pm.save_pretrained(tmp / "lora")
    ref = peft_deltas(pm)
    dm = lora_model(base, r=8, seed=4, targets=TARGETS, alpha=8, use_dora=True)
    dm.save_pretrained(tmp / "dora")
    dora_merged = {k: v.detach().clone() for k, v in dm.merge_and_unload().state_dict().items()}
    torch.manual_seed(5)
    conv = TinyConv().eval()
    cm = lora_model(conv, r=4, seed=6, targets=["conv1", "conv2"])
    cm.save_pretrained(tmp / "conv")
    return tmp, base, ref, dora_merged, conv, peft_deltas(cm)


def _svals(d):
    return torch.linalg.svdvals(d.double().reshape(d.shape[0], -1))


def test_resize_to_full_rank_is_lossless(adapters, tmp_path):
    tmp, base, ref, *_ = adapters
    r = cli("resize", tmp / "lora", "--rank", 8, "--out", tmp_path / "r8", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert all(x["rank_in"] == 8 and x["rank_out"] == 8 for x in rep["layers"])
    assert rep["max_rel_error"] < 1e-6
    got = read_delta(tmp_path / "r8", base.state_dict())
    assert set(got) == set(ref)
    for name, d in ref.items():
        assert float((got[name] - d).abs().max()) <= fp32_tol(d, torch.zeros(1)), name


@pytest.mark.parametrize("k", [1, 3, 6])
def test_resize_below_rank_matches_eckart_young(adapters, tmp_path, k):
    tmp, base, ref, *_ = adapters
    out = tmp_path / f"r{k}"
    r = cli("resize", tmp / "lora", "--rank", k, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    rep = {x["target"]: x for x in json.loads(r.stdout)["layers"]}
    got = read_delta(out, base.state_dict())
    for name, d in ref.items():
        s = _svals(d)
        opt = float(s[k:].pow(2).sum().sqrt())
        err = float(torch.linalg.vector_norm(got[name].double() - d.double()))
        assert err == pytest.approx(opt, rel=1e-4, abs=1e-6), name
        assert rep[name]["rel_error"] == pytest.approx(opt / float(s.pow(2).sum().sqrt()), rel=1e-4)
        assert rep[name]["rank_out"] == k


def test_resize_by_energy_and_peft_loads_the_result(adapters, tmp_path):
    from peft import PeftModel

    tmp, base, ref, *_ = adapters
    out = tmp_path / "e"
    r = cli("resize", tmp / "lora", "--energy", 0.8, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    rep = {x["target"]: x for x in json.loads(r.stdout)["layers"]}
    for name, d in ref.items():
        assert rep[name]["rank_out"] == rank_for_energy(_svals(d), 0.8), name
    assert len({x["rank_out"] for x in rep.values()}) > 1  # per-layer ranks → PEFT rank_pattern
    got = read_delta(out, base.state_dict())
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    peft_got = peft_deltas(pm)
    for name in ref:
        assert float((peft_got[name] - got[name]).abs().max()) <= fp32_tol(got[name], torch.zeros(1)), name


def test_resize_dora_keeps_magnitudes(adapters, tmp_path):
    from loraport.formats import load_adapter

    tmp, base, _, dora_merged, *_ = adapters
    r = cli("resize", tmp / "dora", "--rank", 8, "--out", tmp_path / "d8", "--json")
    assert r.exit_code == 0, r.output
    src = {d.target: d for d in load_adapter(tmp / "dora").deltas}
    out = {d.target: d for d in load_adapter(tmp_path / "d8").deltas}
    for name, d in out.items():
        assert torch.equal(d.magnitude, src[name].magnitude)
    got = read_delta(tmp_path / "d8", base.state_dict())
    for name, d in got.items():
        W = base.state_dict()[name]
        want = dora_merged[name] - W
        assert float((d - want).abs().max()) <= fp32_tol(want, dora_merged[name], ulps=16), name
    r = cli("resize", tmp / "dora", "--rank", 2, "--out", tmp_path / "d2")
    assert r.exit_code == 0, r.output
    for d in load_adapter(tmp_path / "d2").deltas:
        assert d.rank() == 2 and torch.equal(d.magnitude, src[d.target].magnitude)


def test_resize_conv(adapters, tmp_path):
    tmp, _, _, _, conv, ref = adapters
    r = cli("resize", tmp / "conv", "--rank", 2, "--out", tmp_path / "c2", "--json")
    assert r.exit_code == 0, r.output
    got = read_delta(tmp_path / "c2", conv.state_dict())
    for name, d in ref.items():
        assert got[name].shape == d.shape
        s = _svals(d)
        err = float(torch.linalg.vector_norm(got[name].double() - d.double()))
        assert err == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-4), name


def test_resize_bad_input(adapters, tmp_path):
    tmp, *_ = adapters
    r = cli("resize", tmp_path / "missing", "--rank", 4, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "not found" in r.stderr and "Traceback" not in r.output
    r = cli("resize", tmp / "lora", "--rank", 4, "--energy", 0.5, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "either --rank or --energy" in r.stderr
    r = cli("resize", tmp / "lora", "--rank", 4, "--out", tmp / "lora")
    assert r.exit_code == 2 and "same as the input" in r.stderr
    assert not (tmp_path / "x").exists()


def test_reported_error_is_that_of_the_written_factors(adapters, tmp_path):
    """bf16 output: the truncation is lossless (optimal_error ≈ 0) but the stored factors are rounded, and
    rel_error must say by how much — measured, not assumed."""
    tmp, base, ref, *_ = adapters
    r = cli("resize", tmp / "lora", "--rank", 8, "--dtype", "bf16", "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    rep = {x["target"]: x for x in json.loads(r.stdout)["layers"]}
    got = read_delta(tmp_path / "b", base.state_dict())
    for name, d in ref.items():
        true = float(torch.linalg.vector_norm(got[name].double() - d.double()) / torch.linalg.vector_norm(d.double()))
        assert rep[name]["optimal_error"] < 1e-6
        assert 1e-4 < true < 2e-2
        assert rep[name]["rel_error"] == pytest.approx(true, rel=1e-3)


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "peft" / "adapters"
FIXTURE_ADAPTERS = sorted(p for p in FIXTURES.glob("*") if p.is_dir())


@pytest.mark.parametrize("src", FIXTURE_ADAPTERS, ids=lambda p: p.name)
def test_resize_every_peft_fixture(src, tmp_path):
    """Every committed PEFT fixture (embeddings, Conv1D, conv, DoRA, rsLoRA + patterns, modules_to_save, bf16)
    resizes to rank 2 with each layer at the Eckart–Young optimum of its own scale·B·A, magnitudes and
    non-LoRA entries carried over."""
    from loraport.formats import load_adapter
    from loraport.lowrank import thin_factors

    out = tmp_path / "r2"
    r = cli("resize", src, "--rank", 2, "--dtype", "fp32", "--out", out)
    assert r.exit_code == 0, r.output
    before = {(d.target, d.rows): d for d in load_adapter(src).deltas}
    after = {(d.target, d.rows): d for d in load_adapter(out).deltas}
    assert set(before) == set(after)
    for key, d in before.items():
        n = after[key]
        assert n.kind == d.kind
        if d.kind != "lora":
            continue
        assert n.transpose == d.transpose and n.rank() == min(2, d.rank())
        ref = torch.matmul(*thin_factors(d)).double()
        got = torch.matmul(*thin_factors(n)).double()
        s = torch.linalg.svdvals(ref)
        opt = float(s[2:].pow(2).sum().sqrt())
        assert float(torch.linalg.vector_norm(got - ref)) == pytest.approx(opt, rel=1e-3, abs=1e-6 * float(s[0]))
        if d.magnitude is not None:
            assert torch.equal(n.magnitude.float(), d.magnitude.float())
