"""LLM.int8 row-wise absmax quantization (bitsandbytes `Int8Params` / `int8_vectorwise_quant`), as pure
functions of tensors, bit-exact with bitsandbytes' CPU op.

The weight is first rounded to fp16 (transformers and bitsandbytes always quantize the fp16 copy, so SCB values
are fp16-representable); SCB[r] = max|W16[r]| as fp32; CB = round_half_even(W16 * (127 / SCB)) as int8 (a zero
row stays zero). Dequantized as CB * SCB[r] * (1/127) in fp32.
"""

from __future__ import annotations

import torch

from loraport.quant.blockwise import run_chunks

INV127 = 7.874015718698502e-3  # the fp64 constant bitsandbytes multiplies by
FP16_MAX = 65504.0
_SERIAL = 1 << 19  # elements per CPU chunk (see blockwise.run_chunks)
_TINY = torch.finfo(torch.float32).tiny


def quantize_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (CB int8 [out, in], SCB fp32 [out]) for a 2-D weight."""
    if W.dim() != 2:
        raise ValueError("int8 row-wise quantization needs a 2-D weight")
    rows, cols = W.shape
    CB = torch.empty((rows, cols), dtype=torch.int8, device=W.device)
    SCB = torch.empty(rows, dtype=torch.float32, device=W.device)
    cpu = W.device.type == "cpu"
    step = max(1, _SERIAL // max(cols, 1)) if cpu else max(rows, 1)

    def job(r: int, work: tuple | None = None) -> None:
        k = min(step, rows - r)
        if work is None:
            a = W[r:r + k].to(torch.float16)
            stats = a.abs().amax(dim=1).float()
            scaled = a.float()
        else:  # reused buffers
            h, f = work[0][: k * cols].view(k, cols), work[1][: k * cols].view(k, cols)
            a = h.copy_(W[r:r + k])
            scaled = f.copy_(a)
            stats = torch.abs(scaled).amax(dim=1)  # |fp16| is exact in fp32
        # fp16 -> fp32 is exact, so this is the peer's fp16 * fp32 product; a zero row: 0 * (127 / tiny) = 0,
        # the zeros the peer produces (from 0 * inf)
        scaled.mul_((127.0 / stats.clamp(min=_TINY)).unsqueeze(1))
        CB[r:r + k].copy_(scaled.round_())
        SCB[r:r + k] = stats

    if cpu:
        n = step * cols
        run_chunks(range(0, rows, step), job,
                   lambda: (torch.empty(n, dtype=torch.float16), torch.empty(n, dtype=torch.float32)))
    else:
        job(0)
    return CB, SCB


def dequantize_int8(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (CB * SCB.view(-1, 1).to(torch.float32) * INV127).to(dtype)
