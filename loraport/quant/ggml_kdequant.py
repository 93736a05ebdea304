"""ggml's k-quants read back in torch: [S, nbytes] super-blocks -> [S, 256] fp32 with the float operations of
gguf.quants' numpy dequantizer (itself ggml-quants.c's `dequantize_row_q*_K`), so the values are bit for bit
the same — ~10x faster than numpy here. Layouts: loraport/quant/ggml_kquants.py and formats/gguf.md.
"""

from __future__ import annotations

import torch

QK = 256


def _u8(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.uint8)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[S, 2] uint8 -> [S, 1] fp32."""
    return b.contiguous().view(torch.float16).float()


def _scale_min_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> (8 scales, 8 mins) as fp32 [S, 8]."""
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return sc.float(), mn.float()


def _bits(b: torch.Tensor, group: int, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """Bytes in groups of `group`, each group read at every shift: [S, n·group] -> [S, n, len(shifts), group]."""
    return (b.reshape(b.shape[0], -1, 1, group) >> shifts.reshape(1, 1, -1, 1)) & mask


def dq2_k(b: torch.Tensor) -> torch.Tensor:
    S = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b[:, 80:82]) * (sc & 0xF).float()).reshape(S, 16, 1)
    ml = (_f16(b[:, 82:84]) * (sc >> 4).float()).reshape(S, 16, 1)
    q = _bits(b[:, 16:80], 32, _u8(0, 2, 4, 6), 3).reshape(S, 16, 16).float()
    return (dl * q - ml).reshape(S, QK)


def dq3_k(b: torch.Tensor) -> torch.Tensor:
    S = b.shape[0]
    sc = b[:, 96:108]
    lo = _bits(sc[:, :8], 8, _u8(0, 4), 0xF).reshape(S, 16)
    hi = _bits(sc[:, 8:], 4, _u8(0, 2, 4, 6), 3).reshape(S, 16)
    dl = (_f16(b[:, 108:110]) * ((lo | (hi << 4)).to(torch.int8) - 32).float()).reshape(S, 16, 1)
    ql = _bits(b[:, 32:96], 32, _u8(0, 2, 4, 6), 3).reshape(S, 16, 16)
    qh = _bits(b[:, :32], 32, torch.arange(8, dtype=torch.uint8), 1).reshape(S, 16, 16) ^ 1
    return (dl * (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()).reshape(S, QK)


def _dq45_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    S = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc).reshape(S, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(S, 8, 1)
    return (d * q.float() - dm).reshape(S, QK)


def dq4_k(b: torch.Tensor) -> torch.Tensor:
    return _dq45_k(b, _bits(b[:, 16:144], 32, _u8(0, 4), 0xF).reshape(-1, 8, 32))


def dq5_k(b: torch.Tensor) -> torch.Tensor:
    ql = _bits(b[:, 48:176], 32, _u8(0, 4), 0xF).reshape(-1, 8, 32)
    qh = _bits(b[:, 16:48], 32, torch.arange(8, dtype=torch.uint8), 1).reshape(-1, 8, 32)
    return _dq45_k(b, ql | (qh << 4))


def dq6_k(b: torch.Tensor) -> torch.Tensor:
    S = b.shape[0]
    d = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(S, 16, 1)
    ql = _bits(b[:, :128], 64, _u8(0, 4), 0xF).reshape(S, 8, 32)
    qh = _bits(b[:, 128:192], 32, _u8(0, 2, 4, 6), 3).reshape(S, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(S, 16, 16).float()
    return (d * q).reshape(S, QK)


DEQUANTIZERS = {"Q2_K": dq2_k, "Q3_K": dq3_k, "Q4_K": dq4_k, "Q5_K": dq5_k, "Q6_K": dq6_k}
