"""ggml's k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K written in torch, code for code what libggml's
`ggml_quantize_chunk` writes without an importance matrix (it then calls ggml-quants.c's
`quantize_row_q*_K_ref`, the quantizer `llama-quantize` uses when given no imatrix). Read back by
`loraport.quant.ggml_kdequant`; layouts and a worked example in formats/gguf.md.

A super-block holds 256 weights: sub-blocks of 32 (Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K), each with its own
scale (and min), the scales themselves quantized against one fp16 `d` (and `dmin`) per super-block:
  Q2_K [16 B scales (4-bit scale | 4-bit min << 4), 64 B 2-bit codes, d, dmin]       x = d·sc·q − dmin·m
  Q3_K [32 B high bits, 64 B 2-bit codes, 12 B 6-bit signed scales, d]               x = d·sc·(q − 4)
  Q4_K [d, dmin, 12 B 6-bit scales and mins, 128 B nibbles]                          x = d·sc·q − dmin·m
  Q5_K [d, dmin, 12 B 6-bit scales and mins, 32 B high bits, 128 B nibbles]          x = d·sc·q − dmin·m
  Q6_K [128 B low nibbles, 64 B 2-bit highs, 16 × int8 scales, d]                    x = d·sc·(q − 32)

Per sub-block the reference searches for the scale: Q2_K/Q4_K/Q5_K (`make_qkx2_quants`) try the range's
own grid and `nstep + 1` stretched grids, fit scale and min to each by weighted least squares and keep the
fit of least weighted error; Q6_K (`make_qx_quants`) tries 19 grids around absmax/−32 and keeps each one that
raises Σwxl²/Σwl²; Q3_K (`make_q3_quants`) sweeps one weight at a time. The candidates are tried in the
reference's order (a kept fit's min moves the next grids), each one vectorized over every sub-block of a
chunk, laid out lanes-first ([lane, sub-block]) so that a sum over a sub-block's weights is a loop of
contiguous adds. The searches (`_qkx2` for Q2_K/Q4_K/Q5_K, `_qx` for Q6_K, `_q3`) run in numpy (their many
small ops dispatch 2-3x cheaper there), the rest in torch. The codes equal libggml's because the float32
arithmetic is the same: every product in C's association order, every sum accumulated lane by lane in order
(`_seqsum`, numpy's add.reduce over the lane axis; torch's own reductions add in another order), true
division (`_rdiv`), a correctly rounded √ (`_sqrt`), nearest_int = round half to even, fp16 by
round-to-nearest-even, C's integer conversions (`_byte`).
"""

from __future__ import annotations

import numpy as np
import torch

QK = 256
GROUP_MAX_EPS = 1e-15


def _seqsum(p: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in index order, in float32: C's `for (i = 0; i < n; ++i) s += p[i];`. numpy's add.reduce
    over an axis that is not the one contiguous in memory adds row after row into the output (its pairwise
    summation runs only along the fast axis: numpy.sum's notes), in one call where torch needs n − 1 adds (2-3x
    faster); where the rows are single elements (the reduced axis would be the fast one), the adds."""
    if p.dim() > 1 and p.shape[-1] > 1 and p.stride(-1) == 1:
        return torch.from_numpy(np.add.reduce(p.numpy(), axis=0))
    rows = p.unbind(0)
    acc = rows[0].clone()
    for r in rows[1:]:
        acc += r
    return acc


def _f32(v: float) -> float:
    return float(np.float32(v))


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t in float32 as C divides (`c / t` on a tensor is t.reciprocal() * c in torch: rounded twice)."""
    return torch.div(torch.tensor(c, dtype=t.dtype), t)


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's float32 sqrt on CPU is not (1 in 5 results 1 ulp off, torch 2.13 AVX2);
    the float64 root rounded to float32 is (53 ≥ 2·24 + 2 bits: no double-rounding error)."""
    return torch.sqrt(t.double()).float()


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back: the value the dequantizer will see."""
    return x.to(torch.float16).float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[S] fp32 -> [S, 2] uint8 (fp16, little-endian)."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _byte(i: torch.Tensor) -> torch.Tensor:
    """An integer-valued float tensor stored in a uint8_t / int8_t, as C converts (modulo 256)."""
    return (i.to(torch.int32) & 0xFF).to(torch.uint8)


# --- the per-sub-block searches -----------------------------------------------------------------------------
# make_qkx2_quants runs in numpy: its ~40 operations per candidate step cost 1-2 µs each to dispatch there against
# 3-5 µs in torch, the arithmetic (float32 SIMD loops, rint = round half to even, true division) is the same, and
# np.add.reduce gives the in-order lane sums in one call: 15-25% faster per super-block, codes unchanged.
_F = np.float32


def _np_seqsum(p: np.ndarray) -> np.ndarray:
    """_seqsum for a numpy array laid out lanes-first (the reduced axis is never the contiguous one here)."""
    return np.add.reduce(p, axis=0)


def _wsum(w: np.ndarray, L: np.ndarray, scale: np.ndarray, mn: np.ndarray, x: np.ndarray, mad: bool,
          buf: np.ndarray) -> np.ndarray:
    """Σ w·loss(scale·L + mn − x), C's order."""
    np.multiply(L, scale, out=buf)
    buf += mn
    buf -= x
    np.abs(buf, out=buf) if mad else np.multiply(buf, buf, out=buf)
    buf *= w
    return _np_seqsum(buf)


def _np_grid(x: np.ndarray, mn: np.ndarray, iscale: np.ndarray, nmax: int, out: np.ndarray) -> np.ndarray:
    """out = clamp(nearest_int(iscale·(x − mn)), 0, nmax), in place."""
    np.subtract(x, mn, out=out)
    out *= iscale
    np.rint(out, out=out)
    return np.clip(out, 0, nmax, out=out)


def _qkx2(xt: torch.Tensor, wt: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool):
    """make_qkx2_quants for N sub-blocks at once. x, w: [n, N] (lane, sub-block). Returns (scale [N],
    the_min [N], L [n, N] float codes in [0, nmax]). The candidates are tried in order and each one's grid
    starts at the min of the best fit so far (as in C), so only the sub-blocks are vectorized; the winner's
    grid (its iscale and starting min) is kept and its codes recomputed once at the end. Flat sub-blocks
    (max == min) divide by zero on the way (NaN, never kept) and get scale 0, codes 0."""
    x, w = xt.numpy(), wt.numpy()
    with np.errstate(all="ignore"):
        mn = np.minimum(x.min(0), _F(0))  # if (min > 0) min = 0
        mx = x.max(0)
        sum_w, sum_x = _np_seqsum(w), _np_seqsum(w * x)
        flat = mx == mn
        La, buf = np.empty_like(x), np.empty_like(x)
        P = np.empty((x.shape[0], 3, x.shape[1]), _F)
        g_iscale = np.divide(_F(nmax), np.where(flat, _F(1), mx - mn))
        g_mn = mn
        scale = np.divide(_F(1), g_iscale)
        best = _wsum(w, _np_grid(x, mn, g_iscale, nmax, La), scale, mn, x, mad, buf)
        for step in range(nstep + 1):
            iscale = np.divide(_F(_F(_F(rmin) + _F(_F(rdelta) * _F(step))) + _F(nmax)), mx - mn)
            _np_grid(x, mn, iscale, nmax, La)
            np.multiply(w, La, out=P[:, 0])
            np.multiply(P[:, 0], La, out=P[:, 1])
            np.multiply(P[:, 0], x, out=P[:, 2])
            sum_l, sum_l2, sum_xl = _np_seqsum(P)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min[pos] = 0
            err = _wsum(w, La, this_scale, this_min, x, mad, buf)
            up = (D > 0) & (err < best)
            g_iscale, g_mn = np.where(up, iscale, g_iscale), np.where(up, mn, g_mn)
            best = np.where(up, err, best)
            scale = np.where(up, this_scale, scale)
            mn = np.where(up, this_min, mn)
        L = _np_grid(x, g_mn, g_iscale, nmax, La)
    if flat.any():  # max == min: every code 0, scale 0
        scale = np.where(flat, _F(0), scale)
        L[:, flat] = 0
    return torch.from_numpy(scale), torch.from_numpy(-mn), torch.from_numpy(L)


def _nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit, also past |f| > 2²² where it wraps (as a float array): the low 23 bits
    of f + 1.5·2²³ in float32. Within range it is round half to even (np.rint), used where f is bounded."""
    bits = (f + _F(12582912.0)).view(np.int32)
    return ((bits & 0x7FFFFF) - 0x400000).astype(_F)


def _np_first_absmax(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude over axis 0, signed, the first one on ties: C's `if (ax > amax) { amax =
    ax; max = x[i]; }` (NaN never taken). A scan over the lanes."""
    mx, amax = np.zeros_like(x[0]), np.zeros_like(x[0])
    for i in range(x.shape[0]):
        ax = np.abs(x[i])
        up = ax > amax
        mx, amax = np.where(up, x[i], mx), np.where(up, ax, amax)
    return mx


def _qx(xt: torch.Tensor, nmax: int):
    """make_qx_quants(rmse_type 1, no weights) for N sub-blocks at once, in numpy as _qkx2. x: [n, N]. Returns
    (scale [N], L [n, N] float codes in [0, 2·nmax))."""
    x = xt.numpy()
    mx = _np_first_absmax(x)
    zero = np.abs(mx) < _F(GROUP_MAX_EPS)
    mx = np.where(zero, _F(1), mx)
    w = x * x
    wx = w * x
    L, buf = np.empty_like(x), np.empty_like(x)
    P = np.empty((x.shape[0], 2, x.shape[1]), _F)
    g_iscale = scale = best = None
    with np.errstate(all="ignore"):
        for k in [0] + [i for i in range(-9, 10) if i]:  # each candidate is compared with the best so far
            iscale = np.divide(_F(-_f32(nmax + _f32(_f32(0.1) * k))), mx)
            np.multiply(x, iscale, out=L)
            np.clip(np.rint(L, out=L), -nmax, nmax - 1, out=L)
            np.multiply(wx, L, out=P[:, 0])
            np.multiply(np.multiply(w, L, out=buf), L, out=P[:, 1])
            sumlx, suml2 = _np_seqsum(P)
            if g_iscale is None:
                g_iscale = iscale
                scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
                best = scale * sumlx
                continue
            up = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            g_iscale = np.where(up, iscale, g_iscale)
            scale = np.where(up, sumlx / suml2, scale)
            best = np.where(up, scale * sumlx, best)
        np.multiply(x, g_iscale, out=L)
        np.clip(np.rint(L, out=L), -nmax, nmax - 1, out=L)
    L += nmax
    scale = np.where(zero, _F(0), scale)
    L[:, zero] = 0
    return torch.from_numpy(scale), torch.from_numpy(L)


def _q3(xt: torch.Tensor, nmax: int):
    """make_q3_quants(do_rmse) for N sub-blocks at once, in numpy as _qkx2: the absmax grid, then up to 5 sweeps
    that move one weight at a time to the code that best fits the others, kept when Σwxl²/Σwl² grows (w = x²).
    A sweep that changes nothing is the reference's stop, and repeating it changes nothing, so every sub-block
    sweeps 5 times. x: [n, N]. Returns (scale [N], L [n, N] float codes in [0, 2·nmax))."""
    x = xt.numpy()
    with np.errstate(all="ignore"):
        mx = _np_first_absmax(x)
        zero = np.abs(mx) < _F(GROUP_MAX_EPS)
        iscale = np.divide(_F(-nmax), np.where(zero, _F(1), mx))
        L = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        w = x * x
        wx = w * x
        sumlx, suml2 = _np_seqsum(wx * L), _np_seqsum(w * L * L)
        for _ in range(5):
            for i in range(x.shape[0]):
                li, wi, wxi = L[i], w[i], wx[i]
                slx0 = sumlx - wxi * li
                sl2 = suml2 - wi * li * li
                new = np.clip(_nearest_int(x[i] * sl2 / slx0), -nmax, nmax - 1)  # unbounded where slx0 is tiny
                slx = slx0 + wxi * new
                sl2 = sl2 + wi * new * new
                up = (slx0 > 0) & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(up, new, li)
                sumlx = np.where(up, slx, sumlx)
                suml2 = np.where(up, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _F(0))
    scale = np.where(zero, _F(0), scale)
    L = np.where(zero, _F(0), L + nmax)
    return torch.from_numpy(scale), torch.from_numpy(L)


def _lanes(x: torch.Tensor, n: int) -> torch.Tensor:
    """[S, 256] super-blocks -> [n, S·256/n] (lane, sub-block), sub-block s·(256/n) + j."""
    return x.reshape(-1, n).t().contiguous()


def _codes(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int):
    """The final codes: nearest_int((x + dm)/d) (or x/d) clamped, the search's codes where d == 0; [S, 256]."""
    q = torch.round((x + dm if dm is not None else x) / d).clamp_(lo, hi) - lo
    q = torch.where(d == 0, L, q)
    return q.t().reshape(-1, QK).to(torch.uint8)


# --- Q4_K / Q5_K ---------------------------------------------------------------------------------------------
def _scales_6bit(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Sub-blocks of 32 searched with make_qkx2_quants (weights av_x + |x|), scales and mins quantized to 6 bits
    against the super-block's largest: (codes [S, 256] uint8, d [S], dmin [S], 12 packed scale bytes [S, 12])."""
    xl = _lanes(x, 32)
    av_x = _sqrt(_seqsum(xl * xl) / 32)
    scales, mins, L = _qkx2(xl, av_x + xl.abs(), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)  # [S, 8]
    max_scale, max_min = _pos_max(scales), _pos_max(mins)
    inv_s = torch.where(max_scale > 0, _rdiv(63, max_scale), torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, _rdiv(63, max_min), torch.zeros_like(max_min))
    ls = _byte(torch.round(inv_s[:, None] * scales)).clamp_(max=63)
    lm = _byte(torch.round(inv_m[:, None] * mins)).clamp_(max=63)
    d, dmin = max_scale / 63, max_min / 63
    dsub = (_fp16_round(d)[:, None] * ls.float()).reshape(-1)
    dmsub = (_fp16_round(dmin)[:, None] * lm.float()).reshape(-1)
    codes = _codes(xl, L, dsub, dmsub, 0, nmax)
    packed = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], 1)
    return codes, d, dmin, packed


def _pos_max(v: torch.Tensor) -> torch.Tensor:
    """C's `float m = 0; if (v > m) m = v;` per row: +0 (never −0) when nothing is positive."""
    m = v.amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[S, 256] codes -> [S, 128]: per 64 weights, byte l holds weight l (low) and weight l + 32 (high)."""
    q = q.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)


_SHIFT8 = torch.arange(8, dtype=torch.uint8)


def q4_k(x: torch.Tensor) -> torch.Tensor:
    """[S, 256] fp32 -> [S, 144] uint8 (quantize_row_q4_K_ref)."""
    q, d, dmin, sc = _scales_6bit(x, 15, -1.0, 20)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), sc, _nibbles(q)], 1)


def q5_k(x: torch.Tensor) -> torch.Tensor:
    """[S, 256] fp32 -> [S, 176] uint8 (quantize_row_q5_K_ref): bit 2k (2k+1) of qh[l] is the high bit of
    weight 64k + l (64k + 32 + l)."""
    q, d, dmin, sc = _scales_6bit(x, 31, -0.5, 15)
    high = (q >> 4).reshape(-1, 8, 32) << _SHIFT8[:, None]
    qh = high[:, 0]
    for k in range(1, 8):
        qh = qh | high[:, k]
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), sc, qh, _nibbles(q)], 1)


# --- Q6_K ----------------------------------------------------------------------------------------------------
def q6_k(x: torch.Tensor) -> torch.Tensor:
    """[S, 256] fp32 -> [S, 210] uint8 (quantize_row_q6_K_ref)."""
    xl = _lanes(x, 16)
    scales, L = _qx(xl, 32)
    scales = scales.reshape(-1, 16)  # [S, 16]
    pick = scales.abs().argmax(1, keepdim=True)  # first of largest |scale|, signed
    max_scale = scales.gather(1, pick)[:, 0]
    zero = max_scale.abs() < _f32(GROUP_MAX_EPS)
    iscale = _rdiv(-128, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d = 1 / iscale
    sc = _byte(torch.round(iscale[:, None] * scales).clamp_(max=127))
    dsub = (_fp16_round(d)[:, None] * sc.view(torch.int8).float()).reshape(-1)
    q = _codes(xl, L, dsub, None, -32, 31).reshape(-1, 2, 4, 32)  # half, quarter, l
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                    (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], 2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    out = torch.cat([ql, qh, sc, _f16_bytes(d)], 1)
    out[zero] = 0  # an all-zero super-block: every byte 0
    return out


# --- Q2_K ----------------------------------------------------------------------------------------------------
def q2_k(x: torch.Tensor) -> torch.Tensor:
    """[S, 256] fp32 -> [S, 84] uint8 (quantize_row_q2_K_ref): scales and mins 4 bits against d, dmin =
    largest / 15; qs[32h + l] holds weights 128h + l + 32k in bits 2k."""
    xl = _lanes(x, 16)
    scales, mins, L = _qkx2(xl, xl.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale, max_min = _pos_max(scales), _pos_max(mins)
    zs, zm = max_scale > 0, max_min > 0
    ls = torch.where(zs[:, None], torch.round(_rdiv(15, max_scale)[:, None] * scales), torch.zeros_like(scales))
    lm = torch.where(zm[:, None], torch.round(_rdiv(15, max_min)[:, None] * mins), torch.zeros_like(mins))
    sc = _byte(ls.to(torch.int32) | (lm.to(torch.int32) << 4))
    d = torch.where(zs, max_scale / 15, torch.zeros_like(max_scale))
    dmin = torch.where(zm, max_min / 15, torch.zeros_like(max_min))
    dsub = (_fp16_round(d)[:, None] * (sc & 0xF).float()).reshape(-1)
    dmsub = (_fp16_round(dmin)[:, None] * (sc >> 4).float()).reshape(-1)
    q = _codes(xl, L, dsub, dmsub, 0, 3).reshape(-1, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)
    return torch.cat([sc, qs, _f16_bytes(d), _f16_bytes(dmin)], 1)


# --- Q3_K ----------------------------------------------------------------------------------------------------
def q3_k(x: torch.Tensor) -> torch.Tensor:
    """[S, 256] fp32 -> [S, 110] uint8 (quantize_row_q3_K_ref): 16 signed 6-bit scales against d = largest
    |scale| / −32 (low 4 bits in bytes 0-7, weight j's high 2 bits in byte 8 + j%4 at bit 2·(j/4)); codes
    q − 4 with the high bit of weight 32b + m in bit b of hmask[m], the low 2 bits packed as Q2_K's."""
    xl = _lanes(x, 16)
    scales, L = _q3(xl, 4)
    scales = scales.reshape(-1, 16)
    pick = scales.abs().argmax(1, keepdim=True)
    max_scale = scales.gather(1, pick)[:, 0]
    has = max_scale != 0
    iscale = _rdiv(-32, torch.where(has, max_scale, torch.ones_like(max_scale)))
    ls = (torch.round(iscale[:, None] * scales).clamp_(-32, 31) + 32).to(torch.uint8)
    ls = torch.where(has[:, None], ls, torch.zeros_like(ls))  # scale bytes stay 0 without a scale
    d = torch.where(has, 1 / iscale, torch.zeros_like(iscale))
    dsub = (_fp16_round(d)[:, None] * (ls.float() - 32)).reshape(-1)
    dsub = torch.where(has.repeat_interleave(16), dsub, torch.zeros_like(dsub))
    q = _codes(xl, L, dsub, None, -4, 3)  # [S, 256], 0..7
    hi = (q >> 2).reshape(-1, 8, 32) << _SHIFT8[:, None]
    hmask = hi[:, 0]
    for b in range(1, 8):
        hmask = hmask | hi[:, b]
    q = (q & 3).reshape(-1, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)
    h = ls >> 4  # [S, 16]
    sc = torch.cat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4),
                    h[:, 0:4] | (h[:, 4:8] << 2) | (h[:, 8:12] << 4) | (h[:, 12:16] << 6)], 1)
    return torch.cat([hmask, qs, sc, _f16_bytes(d)], 1)


QUANTIZERS = {"Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
