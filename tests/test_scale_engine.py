"""The streaming engine's fast paths give the same bytes as the plain computation: kernel copies of untouched
tensors, reused buffers, the fused many-adapter GEMM, the NaN/Inf pre-check, and page release."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_adapter, build_base, shapes  # noqa: E402
from loraport import safetensors_io as sio  # noqa: E402
from loraport.checkpoint import Checkpoint  # noqa: E402
from loraport.safetensors_io import SafetensorsFile, StreamingWriter  # noqa: E402

M = importlib.import_module("loraport.merging")  # the package re-exports merge(); this is the module
STREAM = importlib.import_module("loraport.engine.stream")
APPLY = importlib.import_module("loraport.engine.apply")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scale")
    build_base(d / "base", "tiny", seed=3)
    for i in range(4):
        build_adapter(d / f"ad{i}", "tiny", rank=4 + 4 * i, seed=10 + i)
    return d


def _expected(base: Path, adapters: list[tuple[Path, float]], dtype: torch.dtype | None):
    """W + Σ w·(α/r)·B@A per tensor, computed in fp32 one adapter after the other, rounded once."""
    ck = Checkpoint.open(base)
    ads = []
    for a, w in adapters:
        cfg = json.loads((a / "adapter_config.json").read_text())
        ads.append((SafetensorsFile(a / "adapter_model.safetensors").load_all(), w * cfg["lora_alpha"] / cfg["r"]))
    out = {}
    for name in ck.names():
        t = ck.get(name)
        W = t.float()
        mod = name.removesuffix(".weight")
        for tensors, c in ads:
            key = f"base_model.model.{mod}.lora_A.weight"
            if key in tensors:
                W.addmm_(tensors[f"base_model.model.{mod}.lora_B.weight"], tensors[key], alpha=c)
        out[name] = W.to(dtype or t.dtype)
    ck.close()
    return out


def _load(folder: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint.open(folder)
    got = {n: ck.get(n).clone() for n in ck.names()}
    ck.close()
    return got


@pytest.mark.parametrize("dtype", ["auto", "bf16", "fp32"])
def test_stream_equals_plain_computation(tiny, tmp_path, dtype):
    ads = [(tiny / "ad0", 0.7), (tiny / "ad1", -1.3)]
    M.merge(tiny / "base", ads, tmp_path / "out", dtype=dtype, device="cpu", manifest=False)
    got = _load(tmp_path / "out")
    want = _expected(tiny / "base", ads, None if dtype == "auto" else M.DTYPES[dtype])
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype, n
        assert torch.equal(got[n], want[n]), n  # bit-identical: same ops, same order


def test_small_budget_and_pool_keep_results(tiny, tmp_path, monkeypatch):
    """A budget smaller than one tensor serialises the stages; buffers are then reused for every tensor."""
    ads = [(tiny / "ad0", 1.0)]
    M.merge(tiny / "base", ads, tmp_path / "a", device="cpu", manifest=False)
    monkeypatch.setattr(STREAM, "INFLIGHT_BYTES", 1)
    M.merge(tiny / "base", ads, tmp_path / "b", device="cpu", manifest=False)
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_many_adapters_fused_within_fp32_rounding(tiny, monkeypatch):
    ck = Checkpoint.open(tiny / "base")
    from loraport.formats import load_adapter

    ads = [(load_adapter(tiny / f"ad{i}", base=ck), w) for i, w in enumerate([0.5, -1.0, 2.0, 0.25])]
    plan = M.build_plan(ck, ads)
    name = next(n for n in plan.updated_names() if "down_proj" in n)
    fused = M.merged_tensor(plan, name)
    monkeypatch.setattr(APPLY, "FUSE_MIN", 99)
    seq = M.merged_tensor(plan, name)
    base = ck.get(name).float()
    assert not torch.equal(fused, base)
    # same sum, other rounding order: a few fp32 ulps of the delta's magnitude
    scale = (seq - base).abs().max()
    assert (fused - seq).abs().max() <= 1e-5 * scale
    monkeypatch.setattr(APPLY, "FUSE_MIN", 3)
    two = M.build_plan(ck, ads[:2])  # below the threshold: the sequential path, bit for bit
    monkeypatch.setattr(APPLY, "FUSE_MIN", 99)
    ref = M.merged_tensor(two, name)
    monkeypatch.setattr(APPLY, "FUSE_MIN", 3)
    assert torch.equal(M.merged_tensor(two, name), ref)
    ck.close()


def test_adapters_read_side_by_side_fail_in_order(tiny, tmp_path):
    """Several adapters are read on worker threads; a bad one is still reported by name, the first bad one in
    command-line order, and nothing is written."""
    from loraport.errors import LoraportError

    bad1, bad2 = tmp_path / "bad1", tmp_path / "bad2"
    for b in (bad1, bad2):
        b.mkdir()
        (b / "adapter_config.json").write_text((tiny / "ad0" / "adapter_config.json").read_text())
        (b / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    ads = [(tiny / "ad0", 1.0), (bad2, 1.0), (tiny / "ad1", 1.0), (bad1, 1.0)]
    with pytest.raises(LoraportError, match="bad2"):
        M.merge(tiny / "base", ads, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["copy_file_range", "pread"])
def test_copy_range_writes_the_same_bytes(tmp_path, how, monkeypatch):
    g = torch.Generator().manual_seed(0)
    src = {"a": torch.randn(3, 5, generator=g), "b": torch.randint(0, 9, (7,), generator=g, dtype=torch.int64),
           "c": torch.randn(1000, 33, generator=g).half(), "e": torch.empty(0, 4)}
    sio.save_file(src, tmp_path / "in.safetensors", {"k": "v"})
    f = SafetensorsFile(tmp_path / "in.safetensors")
    monkeypatch.setitem(sio._COPY, "how", how)
    ents = [(n, f.tensors[n].dtype, f.tensors[n].shape) for n in f.names()]
    for out, use_copy in (("x", True), ("y", False)):
        w = StreamingWriter(tmp_path / f"{out}.safetensors", ents, {"k": "v"})
        for n in f.names():
            if use_copy and n != "b":  # mixed: kernel copies between ordinary writes keep the position right
                w.copy_range(n, *f.span(n))
            else:
                w.write(n, f.raw(n))
        w.close()
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "in.safetensors").read_bytes()
    f.close()


def test_copy_range_refuses_wrong_sizes(tmp_path):
    sio.save_file({"a": torch.zeros(4)}, tmp_path / "in.safetensors")
    f = SafetensorsFile(tmp_path / "in.safetensors")
    w = StreamingWriter(tmp_path / "o.safetensors", [("a", torch.float32, (4,))])
    fd, off, n = f.span("a")
    with pytest.raises(RuntimeError):
        w.copy_range("a", fd, off, n - 4)
    with pytest.raises(RuntimeError):
        w.copy_range("z", fd, off, n)
    w.abort()
    f.close()


def test_release_keeps_views_valid(tiny):
    ck = Checkpoint.open(tiny / "base")
    name = shapes("tiny")[0][0]
    view = ck.get(name)
    before = view.clone()
    ck.release(name)  # pages unmapped from this process; the view faults them back from the page cache
    assert torch.equal(view, before)
    ck.close()


def test_nonfinite_precheck_still_reports_overflow(tiny, tmp_path):
    """An update that overflows fp16 is found by the min/max pre-check and counted by the exact check."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (tiny / "ad0").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["r"] * 1e9
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    rep = M.merge(tiny / "base", [bad], tmp_path / "out", device="cpu", manifest=False)
    assert rep["warnings"] and any("non-finite" in w for w in rep["warnings"])
    clean = M.merge(tiny / "base", [tiny / "ad0"], tmp_path / "out2", device="cpu", manifest=False)
    assert not clean["warnings"]


def test_stage_thread_settings_stay_in_their_thread():
    """The pipeline stages and quantizer workers each limit torch's intra-op threads for themselves only
    (loraport/threads.py relies on OpenMP keeping the setting per thread); the caller's setting survives
    a merge-stage style thread and a torch_threads block."""
    import threading

    import torch

    from loraport.threads import torch_threads

    before = torch.get_num_threads()
    seen = []

    def stage():
        torch.set_num_threads(1)
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=stage)
    t.start()
    t.join()
    assert seen == [1] and torch.get_num_threads() == before
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_early_writeback_keeps_every_byte(tmp_path, monkeypatch):
    """The writer starts writeback of finished ranges as it goes (every WRITEBACK_STEP bytes); with a tiny step
    every tensor triggers it, and the file still reads back exactly (safetensors' own loader) and hashes
    the same as the bytes written."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    from loraport import safetensors_io as S

    monkeypatch.setattr(S, "WRITEBACK_STEP", 1000)
    g = torch.Generator().manual_seed(0)
    ts = {f"t{i}": torch.randn(37 + i, 29, generator=g).to(torch.float16 if i % 2 else torch.float32)
          for i in range(12)}
    w = S.StreamingWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()],
                          hash=True)
    for k, v in ts.items():
        w.write(k, v)
        assert w._flushed > 0
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    assert w.sha256() == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_count_nonfinite_fast_path_is_exact(dtype):
    from loraport.finite import count_nonfinite

    big = torch.finfo(dtype).max
    t = torch.full((1000,), big, dtype=dtype)  # every value finite, the sum overflows: counted exactly, 0
    assert count_nonfinite(t) == 0
    t[3], t[7] = float("inf"), float("-inf")  # +inf + -inf = NaN in the sum; still two
    assert count_nonfinite(t) == 2
    t = torch.randn(4096, dtype=torch.float32).to(dtype)
    assert count_nonfinite(t) == 0
    t[100] = float("nan")
    assert count_nonfinite(t) == 1
