"""Spectrum report (numbers checked against a dense fp64 SVD of PEFT's own ΔW) and its PNG."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _decompose_util import LINEAR_TARGETS, cli, lora_model, peft_deltas, tiny_llama
from loraport.adapter import Adapter, LoraDelta


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spectrum")
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp / "base")
    pm = lora_model(base, r=8, seed=7, targets=LINEAR_TARGETS)
    pm.save_pretrained(tmp / "lora")
    return tmp, base, peft_deltas(pm)


def test_report_numbers_match_dense_svd(adapter):
    from loraport.checkpoint import Checkpoint
    from loraport.formats import load_adapter
    from loraport.spectrum import spectrum_report

    tmp, base, ref = adapter
    rep = spectrum_report(load_adapter(tmp / "lora"), base=Checkpoint.open(tmp / "base"))
    json.dumps(rep)  # JSON-ready
    assert {x["target"] for x in rep["layers"]} == set(ref)
    sd = base.state_dict()
    for x in rep["layers"]:
        d = ref[x["target"]].double()
        s = torch.linalg.svdvals(d)[:8]
        torch.testing.assert_close(torch.tensor(x["singular_values"], dtype=torch.float64), s, rtol=1e-5,
                                   atol=1e-6 * float(s[0]))
        p = s / s.sum()
        assert x["effective_rank"] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-5)
        e = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
        assert x["rank_90"] == int((e < 0.9).sum()) + 1
        assert x["rel_to_base"] == pytest.approx(float(d.norm() / sd[x["target"]].double().norm()), rel=1e-5)
        assert x["rank"] == 8 and x["kind"] == "lora"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_inspect_plot_writes_png_and_json(adapter, tmp_path):
    tmp, *_ = adapter
    png = tmp_path / "spectrum.png"
    r = cli("inspect", tmp / "lora", "--plot", png, "--base", tmp / "base", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert len(rep["spectrum"]["layers"]) == 14 and "rel_to_base" in rep["spectrum"]["layers"][0]
    w, h = _png_size(png)
    assert w >= 800 and h >= 600
    assert not list(tmp_path.glob(".spectrum.png*"))


def test_plot_many_layers_and_no_base(tmp_path):
    from loraport.spectrum import plot_spectrum, spectrum_report

    g = torch.Generator().manual_seed(0)
    deltas = [LoraDelta(f"model.layers.{i // 7}.mlp.p{i % 7}.weight", A=torch.randn(16, 48, generator=g),
                        B=torch.randn(40, 16, generator=g) * (0.9 ** torch.arange(16)), scale=0.5)
              for i in range(150)]
    rep = spectrum_report(Adapter(deltas, "synthetic", name="many"))
    assert rep["num_layers"] == 150 and "max_rel_to_base" not in rep
    w, h = _png_size(plot_spectrum(rep, tmp_path / "many.png"))
    assert w > 1200
