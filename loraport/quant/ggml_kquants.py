"""ggml's k-quants Q2_K, Q4_K, Q5_K, Q6_K written in torch, code for code what libggml's
`ggml_quantize_chunk` writes without an importance matrix (it then calls ggml-quants.c's
`quantize_row_q*_K_ref`, the quantizer `llama-quantize` uses when given no imatrix).

A super-block holds 256 weights: sub-blocks of 32 (Q4_K, Q5_K) or 16 (Q2_K, Q6_K), each with its own scale
(and min), the scales themselves quantized against one fp16 `d` (and `dmin`) per super-block:
  Q2_K [16 B scales (4-bit scale | 4-bit min << 4), 64 B 2-bit codes, d, dmin]       x = d·sc·q − dmin·m
  Q4_K [d, dmin, 12 B 6-bit scales and mins, 128 B nibbles]                          x = d·sc·q − dmin·m
  Q5_K [d, dmin, 12 B 6-bit scales and mins, 32 B high bits, 128 B nibbles]          x = d·sc·q − dmin·m
  Q6_K [128 B low nibbles, 64 B 2-bit highs, 16 × int8 scales, d]                    x = d·sc·(q − 32)

Per sub-block the reference searches for the scale: Q2_K/Q4_K/Q5_K (`make_qkx2_quants`) try the range's
own grid and `nstep + 1` stretched grids, fit scale and min to each by weighted least squares and keep the
grid of least weighted error; Q6_K (`make_qx_quants`) tries 19 grids around absmax/−32 and keeps each one
that raises Σwxl²/Σwl². Here every candidate grid of every sub-block is computed at once (lanes × candidates
× sub-blocks), and the choice made in the reference's order. The codes equal libggml's because the float32
arithmetic is the same: every product in C's association order, every sum accumulated lane by lane in order
(`_seqsum`; torch's own reductions add in another order), nearest_int = round half to even, fp16 by
round-to-nearest-even. Q3_K (`make_q3_quants`, a per-weight coordinate descent) has no quantizer here.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 256
GROUP_MAX_EPS = 1e-15


def _seqsum(p: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in index order, in float32: C's `for (i = 0; i < n; ++i) s += p[i];`."""
    acc = p[0].clone()
    for i in range(1, p.shape[0]):
        acc += p[i]
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
def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool):
    """make_qkx2_quants for N sub-blocks at once. x, w: [n, N] (lane, sub-block). Returns (scale [N],
    the_min [N], L [n, N] float codes in [0, nmax]). The candidates are tried in order and each one's grid
    starts at the min of the best fit so far (as in C), so only the sub-blocks are vectorized."""
    mn = x.amin(0).clamp_max(0)  # if (min > 0) min = 0
    mx = x.amax(0)
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    flat = mx == mn
    scale = _rdiv(nmax, torch.where(flat, torch.ones_like(mx), mx - mn))  # iscale, then its inverse
    L = torch.round(scale * (x - mn)).clamp_(0, nmax)
    scale = 1 / scale
    best = _seqsum(w * _loss(scale * L + mn - x, mad))
    rmin, rdelta = _f32(rmin), _f32(rdelta)  # C's float parameters
    P = torch.empty((x.shape[0], 3, x.shape[1]))
    for step in range(nstep + 1):
        c = _f32(_f32(rmin + _f32(rdelta * step)) + nmax)
        La = torch.round(_rdiv(c, mx - mn) * (x - mn)).clamp_(0, nmax)
        torch.mul(w, La, out=P[:, 0])
        torch.mul(P[:, 0], La, out=P[:, 1])
        torch.mul(P[:, 0], x, out=P[:, 2])
        sum_l, sum_l2, sum_xl = _seqsum(P)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = this_min.masked_fill_(pos, 0)
        err = _seqsum(w * _loss(this_scale * La + this_min - x, mad))
        up = (D > 0) & (err < best)
        L = torch.where(up, La, L)
        best = torch.where(up, err, best)
        scale = torch.where(up, this_scale, scale)
        mn = torch.where(up, this_min, mn)
    if bool(flat.any()):  # max == min: every code 0, scale 0
        scale = scale.masked_fill(flat, 0)
        L = L.masked_fill(flat, 0)
    return scale, -mn, L


def _loss(diff: torch.Tensor, mad: bool) -> torch.Tensor:
    return diff.abs_() if mad else diff.square_()


def _qx(x: torch.Tensor, nmax: int):
    """make_qx_quants(rmse_type 1, no weights) for N sub-blocks at once. x: [n, N]. Returns (scale [N],
    L [n, N] float codes in [0, 2·nmax))."""
    idx = x.abs().argmax(0, keepdim=True)  # first of largest |x|, signed
    mx = x.gather(0, idx)[0]
    zero = mx.abs() < _f32(GROUP_MAX_EPS)
    coef = [float(nmax)] + [_f32(nmax + _f32(_f32(0.1) * i)) for i in range(-9, 10) if i]
    iscale = -torch.tensor(coef)[:, None] / torch.where(zero, torch.ones_like(mx), mx)  # [K, N]
    L = torch.round(iscale * x[:, None]).clamp_(-nmax, nmax - 1)  # [n, K, N]
    w = x * x
    wL = w[:, None] * L
    s = _seqsum(torch.stack([(w * x)[:, None] * L, wL * L], 1))  # [2, K, N]
    sumlx, suml2 = s[0], s[1]
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(mx))
    best = scale * sumlx[0]
    pick = torch.zeros_like(mx, dtype=torch.int64)
    for k in range(1, len(coef)):  # the reference's order: each candidate is compared with the best so far
        up = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
        scale = torch.where(up, sumlx[k] / suml2[k], scale)
        best = torch.where(up, scale * sumlx[k], best)
        pick = torch.where(up, k, pick)
    L = L.gather(1, pick[None, None].expand(L.shape[0], 1, -1))[:, 0] + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L


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
    max_scale = scales.amax(1).clamp_min(0)
    max_min = mins.amax(1).clamp_min(0)
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
    max_scale = scales.amax(1).clamp_min(0)
    max_min = mins.amax(1).clamp_min(0)
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


QUANTIZERS = {"Q2_K": q2_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
