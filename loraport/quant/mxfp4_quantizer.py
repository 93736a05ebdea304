"""The MXFP4 sink: writes merged gpt-oss expert parameters as `P_blocks` + `P_scales` (the protocol of
loraport/quant/__init__.py, the codec of loraport.quant.mxfp4; spec: formats/fp8.md, section MXFP4).

* Bound to an MXFP4 base (`Mxfp4Checkpoint`), it writes the base's layout back: the same tensors, shapes and
  dtypes; an untouched parameter's stored blocks and scales copied as they are (`unchanged`), so only updated
  parameters are re-quantized; config.json keeps the base's `quantization_config`.
* Bound to a 16-bit gpt-oss folder (`--quantize mxfp4`), it quantizes the experts' `gate_up_proj` / `down_proj`
  (what transformers' own Mxfp4 quantizer converts) and writes gpt-oss's `quantization_config`; attention,
  router, embeddings and head stay 16-bit, as in OpenAI's release.
"""

from __future__ import annotations

import re

import torch

from loraport.errors import BadInputError
from loraport.quant import mxfp4 as M
from loraport.quant.metrics import finite, record_delta, rel_error
from loraport.quant.quantizer import METRIC_ELEMS
from loraport.quant.writeback import WritebackQuantizer

_EXPERTS = re.compile(r"(^|\.)mlp\.experts\.(gate_up_proj|down_proj)$")
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


class Mxfp4Quantizer(WritebackQuantizer):
    name = "mxfp4"
    bits = 4

    def bind(self, base) -> None:
        if self.src is not None:
            return
        own = base.own_layout()
        if isinstance(own, Mxfp4Quantizer):  # --quantize mxfp4 on an MXFP4 base: its own layout
            self.src = own.src
            return
        if base.kind != "hf-folder" or base.model_type() != "gpt_oss":
            raise BadInputError(f"{base.root}: --quantize mxfp4 writes gpt-oss's MXFP4 expert layout, which "
                                f"transformers reads only for model_type 'gpt_oss' model folders (this base: "
                                f"{base.model_type() or base.kind!r}); use --quantize fp8/nf4 for other models")
        super().bind(base)

    def _eligible(self, name, shape, hint):
        if self.src is not None:
            return name in self.src.specs, "not stored as MXFP4 in the base"
        if not _EXPERTS.search(name) or len(shape) != 3:
            return False, "not a gpt-oss expert parameter"
        if shape[1] % M.BLOCK or 0 in shape:
            return False, f"input size {shape[1]} is not a multiple of {M.BLOCK}"
        return True, ""

    def _entries(self, name, shape):
        E, inn, out = shape
        G = inn // M.BLOCK
        return [(name + "_blocks", torch.uint8, (E, out, G, M.BLOCK // 2)),
                (name + "_scales", torch.uint8, (E, out, G))]

    def unchanged(self, name: str) -> list[torch.Tensor] | None:
        """An untouched parameter of an MXFP4 base: its stored blocks and scales (no re-quantization)."""
        if self.src is None or name not in self.src.specs:
            return None
        spec = self.src.specs[name]
        return [self.src.stored.get(spec.weight), self.src.stored.get(spec.aux["scale"])]

    def quantize(self, name: str, merged32: torch.Tensor, base32: torch.Tensor | None = None) -> dict:
        """The blocks and scales of the merged parameter, and a report row (delta kept, codes changed) when the
        base is given."""
        shape = tuple(merged32.shape)
        if self.entries(name, shape) is None:
            raise ValueError(f"{name} was not planned for quantization")
        if not bool(torch.isfinite(merged32).all()) or M.scale_overflows(merged32):
            raise BadInputError(f"{name}: the merged weight has inf/NaN or values beyond MXFP4's range; cannot "
                                f"quantize it (check the adapter's scale and weight, or write --dtype bf16)")
        blocks, scales = M.quantize(merged32)
        row = {"name": name, "shape": list(shape), "layout": "mxfp4 e2m1/e8m0",
               "bytes_before": merged32.numel() * 2, "bytes_after": blocks.numel() + scales.numel()}
        if self.metrics:
            self._metrics(row, name, merged32, blocks, scales, base32)
        self._rows.append(row)
        return {name + "_blocks": blocks.cpu(), name + "_scales": scales.cpu()}

    def _metrics(self, row: dict, name: str, W, blocks, scales, base32) -> None:
        """Metrics on whole experts, evenly spaced, about METRIC_ELEMS elements (blocks never straddle experts,
        so the sampled experts' codes are exactly those written)."""
        E = W.shape[0]
        k = max(1, min(E, METRIC_ELEMS // max(1, W[0].numel())))
        ex = torch.linspace(0, E - 1, k).round().long().unique().to(W.device)
        if k < E:
            row["metric_experts"] = int(ex.numel())

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, ex.to(t.device))

        Ws, bq, sq = pick(W), pick(blocks), pick(scales)
        deq = M.dequantize(bq, sq)
        rel, snr = rel_error(Ws, deq)
        row.update(rel_error=finite(rel), snr_db=finite(snr))
        if base32 is None:
            return
        B = pick(base32).to(W.device, torch.float32)
        if self.src is not None:  # the base is its stored codes: compare with those
            spec = self.src.specs[name]
            bb, sb = pick(self.src.stored.get(spec.weight)), pick(self.src.stored.get(spec.aux["scale"]))
        else:
            bb, sb = M.quantize(B)
        deq_b = M.dequantize(bb.to(W.device), sb.to(W.device))
        x = (bq.to(bb.device) ^ bb).reshape(-1)  # per byte: which of its two FP4 codes moved
        changed = float(((x & 0x0F) != 0).sum() + ((x >> 4) != 0).sum()) / (2 * x.numel())
        record_delta(row, deq, deq_b, Ws - B, codes_changed=round(changed, 6),
                     scales_changed=round(float((sq.to(sb.device) != sb).float().mean()), 6))

    def _config_16bit(self, cfg: dict) -> dict:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": list(NOT_CONVERTED)}
        return cfg
