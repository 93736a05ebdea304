"""The stream reads base tensors with pread into pooled buffers (no memory map): every shape the format allows
goes through that path — 0-dim and empty tensors cast to another dtype next to updated ones — and a shard that
shrinks under a running merge is reported, not read past its end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from loraport.checkpoint import Checkpoint
from loraport.errors import LoraportError
from loraport.merging import merge
from loraport.safetensors_io import SafetensorsFile, save_file

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "fixtures" / "peft" / "bases" / "llama"
ADAPTER = ROOT / "fixtures" / "peft" / "adapters" / "llama_plain"


def _base_with_odd_shapes(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    f = SafetensorsFile(base / "model.safetensors")
    tensors = f.load_all()
    f.close()
    tensors["odd.scalar"] = torch.tensor(3.25)  # 0-dim fp32 (CLIP's logit_scale is one)
    tensors["odd.empty"] = torch.zeros(0, 4)
    tensors["odd.row"] = torch.arange(5, dtype=torch.float32) / 7
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    return base


def test_zero_dim_and_empty_tensors_cast_beside_updated_ones(tmp_path):
    base = _base_with_odd_shapes(tmp_path)
    res = merge(base, [(ADAPTER, 1.0)], tmp_path / "out", dtype="fp16", device="cpu", manifest=False)
    assert res["tensors_updated"] > 0
    got, src = Checkpoint.open(tmp_path / "out"), Checkpoint.open(base)
    for name in ("odd.scalar", "odd.empty", "odd.row"):
        t = got.get(name)
        assert t.dtype == torch.float16 and t.shape == src.get(name).shape, name
        assert torch.equal(t, src.get(name).half()), name
    got.close()
    src.close()


def test_shard_truncated_during_the_merge_is_reported(tmp_path, monkeypatch):
    base = _base_with_odd_shapes(tmp_path)
    shard = base / "model.safetensors"
    from loraport.engine import stream as STREAM

    real = STREAM.Stream.run

    def run_after_truncating(self, progress=None):  # the header was read and checked; then the file shrinks
        with open(shard, "r+b") as fh:
            fh.truncate(shard.stat().st_size // 2)
        return real(self, progress)

    monkeypatch.setattr(STREAM.Stream, "run", run_after_truncating)
    with pytest.raises(LoraportError, match="truncated while reading model.layers"):
        merge(base, [(ADAPTER, 1.0)], tmp_path / "out", device="cpu", manifest=False)
    assert not (tmp_path / "out").exists()
