"""Peak memory does not grow with the model: a ~1.7 GB fp16 Llama-shaped checkpoint merges in a child process
whose private memory (RssAnon, page cache excluded) stays under 600 MB — under 0.4× the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PY, build_adapter, build_base, run_child  # noqa: E402

BOUND = 600 << 20


@pytest.mark.slow
def test_merge_peak_rss_bounded_for_a_model_larger_than_the_bound(tmp_path):
    nbytes = build_base(tmp_path / "base", "1.5g")
    build_adapter(tmp_path / "ad", "1.5g", rank=16)
    assert nbytes > 2.5 * BOUND
    out = tmp_path / "out"
    r = run_child("merge", [PY, "-m", "loraport", "merge", "--base", str(tmp_path / "base"), "--adapter",
                            str(tmp_path / "ad"), "--out", str(out), "--device", "cpu", "--json"])
    assert r.rc == 0, r.err[-2000:]
    assert r.anon > 50 << 20  # the sampler saw the child (torch alone is more)
    assert r.anon < BOUND, f"peak RssAnon {r.anon / 2**20:.0f} MiB for a {nbytes / 2**20:.0f} MiB model"
    # the mapped pages of consumed tensors are released too, so even the total RSS stays below the model size
    assert r.hwm < nbytes, f"peak RSS {r.hwm / 2**20:.0f} MiB"
    rep = json.loads(r.out)
    assert rep["bytes_written"] == nbytes and rep["tensors_updated"] == 7 * 16

    # and it is the merge: two updated tensors equal W + (α/r)·B@A in fp32, rounded once
    from loraport.checkpoint import Checkpoint
    from loraport.safetensors_io import SafetensorsFile

    base, got = Checkpoint.open(tmp_path / "base"), Checkpoint.open(out)
    ad = SafetensorsFile(tmp_path / "ad" / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj"):
        W = base.get(mod + ".weight").float()
        W.addmm_(ad.get(f"base_model.model.{mod}.lora_B.weight"), ad.get(f"base_model.model.{mod}.lora_A.weight"),
                 alpha=cfg["lora_alpha"] / cfg["r"])
        assert torch.equal(got.get(mod + ".weight"), W.half()), mod
    assert torch.equal(got.get("lm_head.weight"), base.get("lm_head.weight"))
    base.close()
    got.close()
    ad.close()
