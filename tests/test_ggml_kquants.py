"""k-quant GGUF writing (loraport/quant/ggml_kquants.py through loraport/quant/ggml.py): codes identical to
libggml's `ggml_quantize_chunk` without an importance matrix — against bytes libggml wrote into a committed
fixture (always), and live against the libggml bundled with llama-cpp-python on fresh random and heavy-tailed
tensors (skipped where llama-cpp-python is not installed). Plus the type table: what is written, what falls
back, and where to."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from _libggml import load as load_libggml
from safetensors.numpy import load_file

from loraport.quant import ggml

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ggml" / "kquants.safetensors"
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _ours(x: np.ndarray, name: str) -> np.ndarray:
    return ggml.quantize(torch.from_numpy(np.ascontiguousarray(x)), ggml.BY_NAME[name]).numpy()


def _first_diff(a: np.ndarray, b: np.ndarray, nbytes: int) -> str:
    rows = np.nonzero((a.reshape(-1, nbytes) != b.reshape(-1, nbytes)).any(1))[0]
    return f"{len(rows)} super-blocks differ, first {rows[:5].tolist()}"


@pytest.mark.parametrize("name", KQUANTS)
def test_codes_equal_libggml_fixture(name):
    f = load_file(str(FIXTURE))
    with np.errstate(all="ignore"):
        ours = _ours(f["input"], name)
    nb = ggml.BY_NAME[name].nbytes
    assert np.array_equal(ours, f[name]), _first_diff(ours, f[name], nb)


@pytest.fixture(scope="module")
def libggml():
    g = load_libggml()
    if g is None:
        pytest.skip("llama-cpp-python (its bundled libggml) is not installed")
    return g


def _inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gaussian": rng.standard_normal((64, 2048)).astype(np.float32) * 0.02,
            "student-t df 2": (rng.standard_t(2, (64, 2048)) * 0.02).astype(np.float32),
            "lognormal scales": (rng.standard_normal((64, 2048))
                                 * np.exp(2 * rng.standard_normal((64, 1)))).astype(np.float32)}


@pytest.mark.parametrize("name", KQUANTS)
def test_codes_equal_libggml_live(libggml, name):
    for seed in (0, 1):
        for label, x in _inputs(seed).items():
            ref, ours = libggml.quantize(x, name), _ours(x, name)
            assert np.array_equal(ours, ref), (label, seed, _first_diff(ours, ref, ggml.BY_NAME[name].nbytes))


@pytest.mark.parametrize("name", KQUANTS)
def test_dequantize_equals_gguf_quants(name):
    """loraport reads k-quants in torch (quant/ggml_kdequant.py): every value equal to gguf.quants' numpy
    dequantizer, on arbitrary bytes (every code, scale and sign pattern) with the fp16 super-block scales set
    to finite values, and on the fixture libggml wrote."""
    t = ggml.BY_NAME[name]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (512, t.nbytes), dtype=np.uint8)
    scales = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[name]
    for off in scales:
        raw[:, off:off + 2] = rng.uniform(-3, 3, (512, 1)).astype(np.float16).view(np.uint8)
    raw = np.concatenate([raw, load_file(str(FIXTURE))[name].reshape(-1, t.nbytes)])
    qt = gguf.GGMLQuantizationType(t.id)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(raw, qt).astype(np.float32)
    got = ggml.dequantize(torch.from_numpy(raw.copy()).reshape(-1), t, want.shape).numpy()
    assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("name", KQUANTS)
def test_codes_equal_libggml_wherever_its_scales_are_finite(libggml, name):
    """Weights spread over ~20 orders of magnitude: where libggml's own fp16 scales overflow (its output
    dequantizes to inf/NaN) both sides write garbage and the bytes may differ; everywhere else they are equal."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((512, 256)) * np.exp(6 * rng.standard_normal((512, 256)))).astype(np.float32)
    t = ggml.BY_NAME[name]
    with np.errstate(all="ignore"):
        ref, ours = libggml.quantize(x, name).reshape(len(x), -1), _ours(x, name).reshape(len(x), -1)
        finite = np.isfinite(gguf.quants.dequantize(ref, gguf.GGMLQuantizationType(t.id))).all(1)
    assert 50 < finite.sum() < len(x)  # both kinds present
    assert np.array_equal(ours[finite], ref[finite]), _first_diff(ours[finite], ref[finite], t.nbytes)


def test_error_falls_with_bits():
    """A sanity check that does not need libggml: dequantized by gguf.quants, the RMS error falls with every bit
    (Q2_K > Q3_K > Q4_K > Q5_K > Q6_K > Q8_0) and Q4_K beats the legacy Q4_0 of the same size class."""
    x = np.random.default_rng(5).standard_normal((32, 512)).astype(np.float32)
    err = {}
    for name in (*KQUANTS, "Q4_0", "Q8_0"):
        t = ggml.BY_NAME[name]
        back = gguf.quants.dequantize(_ours(x, name).reshape(x.shape[0], -1), gguf.GGMLQuantizationType(t.id))
        err[name] = float(np.sqrt(np.mean((back - x) ** 2)))
    chain = [err[n] for n in (*KQUANTS, "Q8_0")]
    assert chain == sorted(chain, reverse=True), err
    assert err["Q4_K"] < err["Q4_0"], err
    assert 0.02 < err["Q4_K"] < 0.1, err  # ~4.5 bits on unit Gaussians: neither lossless nor broken


def test_nonfinite_and_ragged_rows():
    x = np.random.default_rng(2).standard_normal((2, 256)).astype(np.float32)
    x[0, 3], x[1, 9] = np.nan, np.inf
    for name in KQUANTS:  # NaN/inf weights (reported by the merge's finite check) still give a whole tensor
        assert _ours(x, name).size == 2 * ggml.BY_NAME[name].nbytes
    with pytest.raises(ValueError, match="multiple of Q4_K's block of 256"):
        _ours(np.zeros((2, 128), np.float32), "Q4_K")


def test_type_table():
    """k-quants are written as themselves; each type read but not written falls back to a writable type with at
    least as many bits per weight whose block divides its own (every row it holds stays whole blocks)."""
    for name in KQUANTS:
        t = ggml.BY_NAME[name]
        assert ggml.writable(t) is t and t.id in ggml.TYPES
    for t in ggml.READ_ONLY.values():
        f = ggml.writable(t)
        assert f.id in ggml.TYPES and t.block % f.block == 0, t.name
        assert f.nbytes * 8 / f.block >= t.nbytes * 8 / t.block, (t.name, f.name)
        qt = gguf.GGMLQuantizationType(t.id)
        assert (t.block, t.nbytes) == gguf.GGML_QUANT_SIZES[qt] and qt.name == t.name
    assert not set(ggml.UNSUPPORTED) & (set(ggml.TYPES) | set(ggml.READ_ONLY))


def test_lane_sums_add_in_index_order():
    """The searches' sums over a sub-block's lanes (ggml_kquants._seqsum, numpy's add.reduce over the outer axis,
    the row-by-row adds where a row is one element) equal C's float loop `s += p[i]` in index order, on values
    spread over 40 orders of magnitude where any other order (pairwise, blocked) rounds differently."""
    from loraport.quant.ggml_kquants import _seqsum

    rng = np.random.default_rng(5)
    for n, N in ((16, 4099), (32, 8192), (2, 9), (32, 1)):
        p = (rng.standard_normal((n, 3, N)) * np.exp(rng.uniform(-45, 45, (n, 3, N)))).astype(np.float32)
        want = np.zeros((3, N), np.float32)
        for i in range(n):  # float32 adds, one row after the other
            want = want + p[i]
        for got, ref in ((_seqsum(torch.from_numpy(p)), want), (_seqsum(torch.from_numpy(p)[:, 1]), want[1])):
            assert np.array_equal(got.numpy(), ref), (n, N)
    p = (rng.standard_normal((32, 64)) * np.exp(rng.uniform(-45, 45, (32, 64)))).astype(np.float32)
    seq = p[0].copy()
    for i in range(1, 32):
        seq = seq + p[i]
    assert not np.array_equal(np.add.reduce(np.ascontiguousarray(p.T), axis=1), seq)  # the data tells orders apart
    assert not np.array_equal(torch.from_numpy(p).sum(0).numpy(), seq)
