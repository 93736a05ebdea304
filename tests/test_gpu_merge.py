"""The CUDA path (pinned double-buffered prefetch on a side stream, math on the GPU) gives the CPU path's result
within fp32 rounding. Skipped without CUDA; run by bench/gpu_check.sh."""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_adapter, build_base  # noqa: E402
from loraport.checkpoint import Checkpoint  # noqa: E402

M = importlib.import_module("loraport.merging")
FX = ROOT / "fixtures" / "peft"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (base, [(adapter, weight)]) from the committed PEFT fixtures: plain, DoRA, embeddings, Conv1D, conv2d, bf16,
# tied weights, modules_to_save, sharded, weighted pairs
CASES = {
    "plain": ("llama", [("llama_plain", 1.0)]),
    "dora": ("llama", [("llama_dora", 1.0)]),
    "embed": ("llama", [("llama_embed", 1.0)]),
    "mts": ("llama", [("llama_mts", 1.0)]),
    "rslora": ("llama", [("llama_rslora_patterns", 1.0)]),
    "conv1d_dora": ("gpt2", [("gpt2_dora", 1.0)]),
    "tied_gpt2": ("gpt2", [("gpt2_tied_embed", 1.0)]),
    "bf16_dora": ("qwen2_bf16", [("qwen2_dora_bf16", 1.0)]),
    "sharded_pair": ("llama_sharded", [("llama_plain2", 1.5), ("llama_dora", 0.5)]),
    "conv2d_dora": ("conv/model.safetensors", [("conv_dora", 1.0)]),
}


def _merge(case: str, dev: str, dtype: str, out: Path) -> dict[str, torch.Tensor]:
    base_rel, ads = CASES[case]
    base = FX / "bases" / base_rel
    out.mkdir(parents=True, exist_ok=True)
    out = out / ("m.safetensors" if base.is_file() else "m")
    M.merge(base, [(FX / "adapters" / a, w) for a, w in ads], out, device=dev, dtype=dtype, manifest=False)
    ck = Checkpoint.open(out)
    got = {n: ck.get(n).clone() for n in ck.names()}
    ck.close()
    return got


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each value in its own dtype."""
    f = t.float().abs()
    eps = torch.finfo(t.dtype).eps
    tiny = torch.finfo(t.dtype).tiny
    return torch.clamp(2.0 ** torch.floor(torch.log2(torch.clamp(f, min=tiny))) * eps, min=tiny)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_equals_cpu_fp32(case, tmp_path):
    cpu = _merge(case, "cpu", "fp32", tmp_path / "cpu")
    gpu = _merge(case, "cuda", "fp32", tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for n in cpu:
        assert gpu[n].dtype == cpu[n].dtype, n
        tol = 1e-5 * max(1.0, float(cpu[n].abs().max()))
        assert float((gpu[n] - cpu[n]).abs().max()) <= tol, n


@pytest.mark.parametrize("case", ["plain", "bf16_dora", "sharded_pair"])
def test_cuda_equals_cpu_in_output_dtype(case, tmp_path):
    """Rounded to a 16-bit base dtype, the two paths agree to one ulp (an fp32 difference may cross a rounding
    edge); an fp32 base keeps the fp32 sums, which agree within fp32 rounding of the delta (as in the fp32 test:
    the GPU's GEMM adds in another order)."""
    cpu = _merge(case, "cpu", "auto", tmp_path / "cpu")
    gpu = _merge(case, "cuda", "auto", tmp_path / "gpu")
    for n in cpu:
        assert gpu[n].dtype == cpu[n].dtype, n
        if not cpu[n].is_floating_point():
            assert torch.equal(gpu[n], cpu[n]), n
            continue
        if cpu[n].dtype == torch.float32:
            assert float((gpu[n] - cpu[n]).abs().max()) <= 1e-5 * max(1.0, float(cpu[n].abs().max())), n
            continue
        assert bool(((gpu[n].float() - cpu[n].float()).abs() <= _ulp(cpu[n])).all()), n


def test_cuda_many_adapters_fused(tmp_path):
    build_base(tmp_path / "base", "tiny", seed=5)
    ads = []
    for i in range(4):
        build_adapter(tmp_path / f"a{i}", "tiny", rank=8, seed=20 + i)
        ads.append((tmp_path / f"a{i}", 0.25 * (i + 1)))
    outs = {}
    for dev in ("cpu", "cuda"):
        M.merge(tmp_path / "base", ads, tmp_path / dev, device=dev, dtype="fp32", manifest=False)
        ck = Checkpoint.open(tmp_path / dev)
        outs[dev] = {n: ck.get(n).clone() for n in ck.names()}
        ck.close()
    for n, t in outs["cpu"].items():
        assert float((outs["cuda"][n] - t).abs().max()) <= 1e-5 * max(1.0, float(t.abs().max())), n


@pytest.mark.parametrize("limit", [256 << 20, 1 << 10])
def test_stager_prefetch_round_trip(limit):
    """Tensors staged through the two pinned buffers arrive intact on the compute thread's stream, including
    ones larger than the staging limit (copied synchronously) and buffers reused many times."""
    dev = torch.device("cuda")
    st = importlib.import_module("loraport.engine.device").CudaStager(dev, limit=limit)
    g = torch.Generator().manual_seed(0)
    src = []
    for i in range(40):
        shape = (int(torch.randint(1, 300, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g)))
        dt = (torch.float16, torch.bfloat16, torch.float32)[i % 3]
        src.append(torch.randn(shape, generator=g).to(dt))
    staged = []

    def reader():  # as in the engine: staging runs on its own thread
        for t in src:
            staged.append(st.to_device(t))

    th = threading.Thread(target=reader)
    th.start()
    th.join()
    for t, (d, ev) in zip(src, staged):
        if ev is not None:
            st.ready(d, ev)
        assert d.device.type == "cuda"
        assert torch.equal(d.cpu(), t)


def test_cuda_quantize_nf4_matches_cpu(tmp_path):
    pytest.importorskip("loraport.quant")
    base = FX / "bases" / "llama"
    outs = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / dev
        M.merge(base, [FX / "adapters" / "llama_plain"], out, device=dev, quantize="nf4", manifest=False)
        ck = Checkpoint.open(out)
        outs[dev] = {n: ck.get(n).clone() for n in ck.names()}
        ck.close()
    assert outs["cpu"].keys() == outs["cuda"].keys()
    for n, t in outs["cpu"].items():
        u = outs["cuda"][n]
        if t.dtype == torch.uint8:  # packed 4-bit codes: a code may flip where fp32 rounding crosses a bin edge
            assert float((u != t).float().mean()) <= 1e-3, n
        elif t.is_floating_point():
            assert float((u.float() - t.float()).abs().max()) <= 1e-5 * max(1.0, float(t.float().abs().max())), n
        else:
            assert torch.equal(u, t), n
