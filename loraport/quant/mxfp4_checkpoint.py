"""An MXFP4 base (gpt-oss as OpenAI ships it, config.json `quantization_config.quant_method: "mxfp4"`) seen as an
ordinary base: each expert parameter stored as `P_blocks` + `P_scales` is served under its logical name `P`
(`model.layers.N.mlp.experts.gate_up_proj` / `down_proj`, [E, in, out] as transformers' GptOssExperts holds
it), dequantized (as bf16, which holds every MXFP4 value exactly); everything else (attention, router,
biases, embeddings) is an ordinary tensor. `own_layout()` is the sink that writes MXFP4 back
(loraport.quant.mxfp4_quantizer). Spec: formats/fp8.md (section MXFP4); codec: loraport.quant.mxfp4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError
from loraport.quant import mxfp4 as M
from loraport.quant.dequant_view import DequantizedView

METHOD = "mxfp4"
BLOCKS, SCALES = "_blocks", "_scales"
OVERFLOW_BYTE = 253  # 2^(253 − 127) × 6 > fp32's max: the smallest scale byte whose block can hold an inf


@dataclass
class Mxfp4Spec:
    """One MXFP4 parameter: its stored blocks (`weight`), scales (`aux["scale"]`) and logical shape."""

    weight: str
    shape: tuple[int, ...]  # logical [E, in, out]
    aux: dict[str, str] = field(default_factory=dict)
    # served as bf16: every E2M1 value × 2^k is exact in bf16 (2 significant bits, fp32's exponent range), so
    # nothing is lost, a view holds half the bytes and an unquantized output defaults to gpt-oss's own dtype
    dtype: torch.dtype = torch.bfloat16


def _qc(ck: Checkpoint) -> dict | None:
    qc = ck.config.get("quantization_config") if isinstance(ck.config, dict) else None
    return qc if isinstance(qc, dict) else None


def has_mxfp4(ck: Checkpoint) -> bool:
    """A base this source claims: quant_method "mxfp4" in config.json, or any `*_blocks` tensor with its
    `*_scales` beside it."""
    qc = _qc(ck)
    if qc is not None and qc.get("quant_method") == METHOD:
        return True
    return any(n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in ck for n in ck.names())


def _bad(ck: Checkpoint, name: str, msg: str) -> BadInputError:
    return BadInputError(f"{ck.root}: {name}: {msg}; the MXFP4 checkpoint is damaged or of an unsupported layout "
                         f"(see formats/fp8.md, MXFP4)")


def _expected(ck: Checkpoint, logical: str) -> tuple[int, int] | None:
    """(in, out) config.json implies for a gpt-oss expert parameter, None when it says nothing."""
    cfg = ck.config if isinstance(ck.config, dict) else {}
    h, i = cfg.get("hidden_size"), cfg.get("intermediate_size")
    if not (isinstance(h, int) and isinstance(i, int)):
        return None
    if logical.endswith("gate_up_proj"):
        return h, 2 * i
    if logical.endswith("down_proj"):
        return i, h
    return None


def _spec(ck: Checkpoint, bname: str) -> tuple[str, Mxfp4Spec]:
    logical = bname[: -len(BLOCKS)]
    sname = logical + SCALES
    if sname not in ck:
        raise _bad(ck, bname, f"no {sname!r} beside it")
    bi, si = ck.info(bname), ck.info(sname)
    for n, i in ((bname, bi), (sname, si)):
        if i.dtype != torch.uint8:
            raise _bad(ck, n, f"stored as {str(i.dtype).removeprefix('torch.')}, expected uint8")
    bs, ss = tuple(bi.shape), tuple(si.shape)
    if len(bs) != 4 or bs[-1] != M.BLOCK // 2 or 0 in bs:
        raise _bad(ck, bname, f"shape {list(bs)} is not [experts, rows, blocks, {M.BLOCK // 2}] (two FP4 codes a "
                              f"byte, {M.BLOCK} per block)")
    if ss != bs[:-1]:
        raise _bad(ck, sname, f"shape {list(ss)} does not match its blocks {list(bs)} (expected {list(bs[:-1])})")
    E, rows, G, _ = bs
    shape = (E, G * M.BLOCK, rows)
    n_exp = ck.config.get("num_local_experts") if isinstance(ck.config, dict) else None
    if isinstance(n_exp, int) and n_exp != E:  # transformers could not load the output: say it before writing
        raise _bad(ck, bname, f"holds {E} experts but config.json num_local_experts is {n_exp}")
    want = _expected(ck, logical)
    if want is not None and shape[1:] != want:
        raise _bad(ck, bname, f"dequantizes to [in, out] = {list(shape[1:])} per expert but config.json "
                              f"(hidden_size, intermediate_size) implies {list(want)}")
    if logical in ck:
        raise _bad(ck, logical, "stored both quantized and unquantized")
    return logical, Mxfp4Spec(bname, shape, {"scale": sname})


def find_specs(ck: Checkpoint) -> dict[str, Mxfp4Spec]:
    specs = dict(_spec(ck, n) for n in ck.names() if n.endswith(BLOCKS))
    stored = {s.aux["scale"] for s in specs.values()}
    for n in ck.names():
        if n.endswith(SCALES) and n not in stored:
            raise _bad(ck, n, f"no {n[: -len(SCALES)] + BLOCKS!r} beside it")
    if not specs:
        raise BadInputError(f"{ck.root}: config.json says quant_method 'mxfp4' but no tensor is stored as MXFP4 "
                            f"blocks (`*_blocks` + `*_scales`); remove quantization_config from config.json")
    qc = _qc(ck)
    if qc is not None and qc.get("quant_method") not in (METHOD, None):
        raise BadInputError(f"{ck.root}: MXFP4 blocks but config.json says quant_method {qc.get('quant_method')!r}")
    return specs


class Mxfp4Checkpoint(DequantizedView):
    """A Checkpoint whose MXFP4 expert parameters are served dequantized in fp32 (see the module docstring)."""

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> Mxfp4Checkpoint:
        return cls._view(ck, find_specs(ck))  # a 16-bit output drops quantization_config

    def is_quantized(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str) -> torch.Tensor:
        spec = self.specs.get(name)
        if spec is None:
            return super().get(name)
        return self.get32(name).to(spec.dtype)

    def get32(self, name: str) -> torch.Tensor:
        spec = self.specs.get(name)
        if spec is None:
            return super().get(name).to(torch.float32)
        scales = self.stored.get(spec.aux["scale"])
        if bool((scales == M.SCALE_NAN).any()):  # checked as read: the scales are 1/16 of the blocks' bytes
            raise _bad(self.stored, spec.aux["scale"], f"holds E8M0 byte {M.SCALE_NAN} (NaN)")
        W = M.dequantize(self.stored.get(spec.weight), scales)
        # bytes 253-254 (2^126, 2^127) times FP4 codes ±2..6 leave fp32: inf weights a 16-bit output would carry
        # silently and the MXFP4 sink blame on the adapter; checked only when such a byte is there
        if scales.numel() and int(scales.max()) >= OVERFLOW_BYTE and not bool(torch.isfinite(W).all()):
            raise _bad(self.stored, spec.aux["scale"], f"holds E8M0 byte {int(scales.max())}: its FP4 values "
                                                       "overflow fp32 (inf)")
        return W

    def storage_of(self, name: str) -> str:
        return "mxfp4 (e2m1 + e8m0 scales per 32)" if name in self.specs else super().storage_of(name)

    def own_layout(self):
        """The sink that writes this base's MXFP4 layout back (the default output of a merge)."""
        from loraport.quant.mxfp4_quantizer import Mxfp4Quantizer

        return Mxfp4Quantizer(source=self)

    def close(self) -> None:
        self.stored.close()
