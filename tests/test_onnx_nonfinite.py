"""The NaN/Inf check on the ONNX paths, exactly as merge runs it: an adapter holding NaN, and a finite adapter
whose merged weight overflows (found only in the stream's merged tensors), into `convert --to onnx` and into a
bake of an .onnx base. Default: a warning and an output; --fail-on-nonfinite: exit 2, one line, nothing left."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from loraport.cli import main
from loraport.safetensors_io import SafetensorsFile, save_file
from tests._hostile_classes import onnx_llama_base
from tests._onnx_util import ADAPTERS, LLAMA

PLAIN = ADAPTERS / "llama_plain"


def _adapter(tmp_path, kind: str):
    """llama_plain with one module's factors edited: "nan" puts a NaN in B; "overflow" makes A and B finite but so
    large that B·A is Inf in fp32."""
    d = tmp_path / f"{kind}_adapter"
    shutil.copytree(PLAIN, d)
    f = d / "adapter_model.safetensors"
    sf = SafetensorsFile(f)
    ts = sf.load_all()
    sf.close()
    b = next(k for k in sorted(ts) if k.endswith("q_proj.lora_B.weight"))
    if kind == "nan":
        ts[b][0, 0] = float("nan")
    else:
        ts[b] = torch.full_like(ts[b], 1e20)
        a = b.replace("lora_B", "lora_A")
        ts[a] = torch.full_like(ts[a], 1e20)
    save_file(ts, f)
    return d


def _run(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res, [x for x in res.stderr.splitlines() if x.strip()]


def _left(tmp_path, stem: str) -> list[str]:
    """What a run writing `tmp_path/stem...` left there (its output, data file or staged copy)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.lstrip(".").startswith(stem))


@pytest.fixture(scope="module")
def onnx_base(tmp_path_factory):
    return onnx_llama_base(tmp_path_factory.mktemp("onnxbase") / "m")


@pytest.mark.parametrize("kind,words", [("nan", "nan_adapter"), ("overflow", "q_proj")])
def test_bake_warns_by_default_and_refuses_on_request(tmp_path, onnx_base, kind, words):
    ad = _adapter(tmp_path, kind)
    res, lines = _run(["merge", "--base", onnx_base, "--adapter", ad, "--out", tmp_path / "warned.onnx"])
    assert res.exit_code == 0, res.stderr
    assert any("warning" in x and "non-finite" in x and words in x for x in lines), res.stderr
    res, lines = _run(["merge", "--base", onnx_base, "--adapter", ad, "--out", tmp_path / "refused.onnx",
                       "--fail-on-nonfinite"])
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "non-finite" in lines[0] and words in lines[0] and "--fail-on-nonfinite" in lines[0]
    assert _left(tmp_path, "refused") == []  # no model, no data file, no stage


def test_export_refuses_a_nan_adapter_before_tracing(tmp_path):
    ad = _adapter(tmp_path, "nan")
    res, lines = _run(["convert", "--to", "onnx", "--base", LLAMA, "--adapter", ad, "--out", tmp_path / "refused",
                       "--fail-on-nonfinite"])
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "non-finite" in lines[0] and "nan_adapter" in lines[0]
    assert _left(tmp_path, "refused") == []


def test_export_finds_an_overflow_in_the_merged_weights(tmp_path, monkeypatch):
    """The adapter is finite: only the stream's check on the merged tensors can see this one. (The graph cache
    is on, in a private folder, so the second export reads the graph the first traced.)"""
    monkeypatch.delenv("LORAPORT_NO_GRAPH_CACHE", raising=False)
    monkeypatch.setenv("LORAPORT_CACHE_DIR", str(tmp_path / "cache"))
    ad = _adapter(tmp_path, "overflow")
    res, lines = _run(["convert", "--to", "onnx", "--base", LLAMA, "--adapter", ad, "--out", tmp_path / "refused",
                       "--fail-on-nonfinite"])
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "non-finite" in lines[0] and "q_proj" in lines[0] and "the base had 0" in lines[0]
    assert _left(tmp_path, "refused") == []
    res, lines = _run(["convert", "--to", "onnx", "--base", LLAMA, "--adapter", ad, "--out", tmp_path / "warned"])
    assert res.exit_code == 0, res.stderr
    assert any("warning" in x and "non-finite" in x and "q_proj" in x for x in lines), res.stderr
    assert (tmp_path / "warned" / "model.onnx.data").is_file()
