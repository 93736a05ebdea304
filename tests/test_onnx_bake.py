"""`loraport merge --base model.onnx`: baking an adapter into ONNX models exported by torch.onnx beforehand —
with HF names kept (dynamo, optimize=False), names lost (TorchScript: `onnx::MatMul_N`, weights stored
transposed), and names *and* node scopes stripped (matched by value against the HF weights). Each baked model
must compute what loraport's own merged export computes."""

from __future__ import annotations

import hashlib
import warnings

import onnx
import pytest
import torch

from tests._onnx_util import ADAPTERS, LLAMA, LogitsOnly, cli, export_kw, feeds, hf_model, max_abs, ort_run, workdir

PLAIN = ADAPTERS / "llama_plain"


def _export_base(kind: str):
    d = workdir("bake-bases")
    path = d / f"{kind}.onnx"
    if path.exists():
        return path
    m = hf_model(LLAMA)
    ids = torch.randint(0, 128, (2, 7))
    am = torch.ones_like(ids)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torchscript":
            torch.onnx.export(LogitsOnly(m), (ids, am), str(path), dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=dyn)
            mp = onnx.load(str(path))
            onnx.save_model(mp, str(path), save_as_external_data=True, location="torchscript.onnx.data")
        else:
            prog = torch.onnx.export(m, (), kwargs={"input_ids": ids, "attention_mask": am}, dynamo=True,
                                     input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                     dynamic_shapes=dyn, optimize=(kind == "dynamo-optimized"))
            prog.save(str(path), external_data=True)
    return path


def _stripped(src):
    """The same graph with every node name and metadata removed: only values identify the weights."""
    path = src.parent / "stripped.onnx"
    if not path.exists():
        m = onnx.load(str(src))
        for n in m.graph.node:
            n.name = ""
            del n.metadata_props[:]
        onnx.save_model(m, str(path), save_as_external_data=True, location="stripped.onnx.data")
    return path


@pytest.fixture(scope="module")
def merged_logits():
    f = feeds(2, 9, seed=11)
    return f, ort_run(export_kw(LLAMA, [(PLAIN, 1.0)]) / "model.onnx", f)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind,how", [("dynamo", "name"), ("torchscript", "scope")])
def test_bake_matches_merged_export(kind, how, merged_logits):
    from loraport.onnx import bake

    f, ref = merged_logits
    base = _export_base(kind)
    data = next(base.parent.glob(f"{kind}.onnx*data"))
    before = (_sha(base), _sha(data))
    out = workdir(f"baked-{kind}") / "model-lora.onnx"
    rep = bake(str(base), [(str(PLAIN), 1.0)], str(out))
    assert rep["matched_by"][how] == 14 and rep["initializers_updated"] == 14
    assert (out.parent / "model-lora.onnx.data").is_file()
    got = ort_run(out, {k: v for k, v in f.items() if k != "position_ids"})
    assert max_abs(got, ref) <= 1e-4
    assert max_abs(ort_run(base, {k: v for k, v in f.items() if k != "position_ids"}), ref) > 1e-2
    assert (_sha(base), _sha(data)) == before  # input untouched


def test_bake_by_value_when_names_and_scopes_are_lost(merged_logits):
    from loraport.errors import PlanError
    from loraport.onnx import bake

    f, ref = merged_logits
    base = _stripped(_export_base("torchscript"))
    out = workdir("baked-stripped") / "m.onnx"
    with pytest.raises(PlanError, match="reference"):
        bake(str(base), [(str(PLAIN), 1.0)], str(out))
    assert not out.exists()
    rep = bake(str(base), [(str(PLAIN), 1.0)], str(out), reference=str(LLAMA))
    assert rep["matched_by"]["value"] == 14
    assert max_abs(ort_run(out, {k: v for k, v in f.items() if k != "position_ids"}), ref) <= 1e-4


def test_merge_cli_dispatches_onnx_bases():
    base = _export_base("dynamo")
    out = workdir("bake-cli") / "baked.onnx"
    r = cli("merge", "--base", str(base), "--adapter", str(PLAIN), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    r = cli("merge", "--base", str(base), "--adapter", str(PLAIN), "--out", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr


@pytest.mark.slow
def test_bake_dynamo_optimized_scope_matching(merged_logits):
    from loraport.onnx import bake

    f, ref = merged_logits
    base = _export_base("dynamo-optimized")
    out = workdir("baked-opt") / "m.onnx"
    rep = bake(str(base), [(str(PLAIN), 1.0)], str(out))
    assert rep["matched_by"]["scope"] == 14
    assert max_abs(ort_run(out, {k: v for k, v in f.items() if k != "position_ids"}), ref) <= 1e-4
