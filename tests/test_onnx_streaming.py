"""How `convert --to onnx` streams weights: untouched base tensors are copied file-to-file or converted in
bounded pieces (never held whole), merged ones converted piecewise. Pieces are shrunk to a few hundred bytes
here so every tensor spans many of them; the results must still equal the merge engine's tensors bit for bit
and, on a 16-bit base exported to fp32, compute what PEFT computes on that base."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import loraport.onnx.external as external
from loraport.onnx.external import Stored
from loraport.safetensors_io import SafetensorsFile, save_file
from tests._onnx_util import ADAPTERS, LLAMA, feeds, max_abs, ort_run, peft_logits

PLAIN = ADAPTERS / "llama_plain"


def _base_as(dtype: torch.dtype, folder):
    """The llama fixture base with its weights stored in `dtype` (what real checkpoints ship: 16-bit)."""
    folder.mkdir()
    for f in LLAMA.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, folder / f.name)
    src = SafetensorsFile(LLAMA / "model.safetensors")
    save_file({n: src.get(n).to(dtype) for n in src.names()}, folder / "model.safetensors", {"format": "pt"})
    src.close()
    return folder


def _initializers(out) -> dict[str, torch.Tensor]:
    m = onnx.load(str(out / "model.onnx"))
    return {i.name: torch.from_numpy(numpy_helper.to_array(i, base_dir=str(out)).copy()) for i in m.graph.initializer}


def test_bf16_base_fp32_export_in_small_pieces_matches_engine_and_peft(tmp_path, monkeypatch):
    from loraport.formats import load_adapter
    from loraport.merging import build_plan, merged_tensor, open_base
    from loraport.onnx import export_onnx

    monkeypatch.setattr(external, "PIECE", 384)  # every tensor in many pieces (not a multiple of a row)
    base = _base_as(torch.bfloat16, tmp_path / "base")
    out = tmp_path / "onnx"
    report = export_onnx(base, [(PLAIN, 1.0)], out)
    assert report["warnings"] == []
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no scratch file left
    ck = open_base(base)
    plan = build_plan(ck, [(load_adapter(PLAIN, base=ck), 1.0)])
    inits = _initializers(out)
    checked = {"touched": 0, "untouched": 0}
    for name, got in inits.items():
        if name not in ck:
            continue
        want = merged_tensor(plan, name)
        assert got.dtype == torch.float32 and torch.equal(got.reshape(want.shape), want), name
        checked["touched" if name in plan.updates else "untouched"] += 1
    ck.close()
    assert checked["touched"] > 0 and checked["untouched"] > 0, checked
    f = feeds(2, 9)
    ref = peft_logits(base, PLAIN, f)
    assert max_abs(ref, peft_logits(base, None, f)) > 1e-2  # the adapter matters
    assert max_abs(ort_run(out / "model.onnx", f), ref) <= 1e-4


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.float16])
def test_writer_pieces_equal_whole_tensor_conversion(tmp_path, monkeypatch, kernel_copy, src_dtype, dst_dtype):
    monkeypatch.setattr(external, "PIECE", 200)
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 29, generator=g).to(src_dtype), "tiny": torch.randn(3, generator=g).to(src_dtype),
               "b": torch.randn(1000, generator=g).to(src_dtype)}
    save_file(tensors, tmp_path / "w.safetensors")
    sf = SafetensorsFile(tmp_path / "w.safetensors")
    onnx_dt = external.TORCH_TO_ONNX[dst_dtype]
    w = external.ExternalDataWriter(tmp_path, "model.onnx.data")
    protos = []
    for name in ("a", "tiny", "b"):
        info = sf.tensors[name]
        fd, off, n = sf.span(name)
        protos.append(w.add_stored(name, Stored(fd, off, n, info.dtype, tuple(info.shape), str(sf.path)), onnx_dt,
                                   tuple(info.shape)))
    merged = tensors["a"].float() * 3  # a "merged" fp32 tensor, converted piecewise by add()
    protos.append(w.add("m", merged, onnx_dt, tuple(merged.shape)))
    w.close()
    sf.close()
    for tp, want in zip(protos, [tensors["a"], tensors["tiny"], tensors["b"], merged]):
        got = numpy_helper.to_array(tp, base_dir=str(tmp_path))
        assert got.dtype == np.dtype({torch.float32: np.float32, torch.float16: np.float16}[dst_dtype])
        assert np.array_equal(got, want.to(dst_dtype).numpy()), tp.name
        if tp.data_location == onnx.TensorProto.EXTERNAL:
            off = int(next(e.value for e in tp.external_data if e.key == "offset"))
            assert off % external.ALIGN == 0
    assert protos[1].data_location != onnx.TensorProto.EXTERNAL  # tiny tensors stay inline


@pytest.mark.parametrize("change", [{"model_type": "no_such_model"}, {"intermediate_size": 40}],
                         ids=["capture-fails", "weights-disagree"])
def test_failure_while_weights_stream_is_one_error_and_leaves_nothing(tmp_path, change):
    import json

    from loraport.errors import BadInputError
    from loraport.onnx import export_onnx

    base = _base_as(torch.float32, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, **change}))
    out = tmp_path / "onnx"
    with pytest.raises(BadInputError) as e:
        export_onnx(base, [(PLAIN, 1.0)], out)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no output, no stage, no scratch file
