"""The fp8 sink: quantizes merged fp32 weights into an fp8 layout (the protocol of loraport/quant/__init__.py),
with the codecs of loraport.quant.fp8 (spec: formats/fp8.md).

* Bound to an fp8 base (`Fp8Checkpoint`), it writes the base's own layout back — per weight the same kind,
  code dtype, scale dtype and shape, block or group size, power-of-two (ue8m0) scales; input scales and the
  `scaled_fp8` marker carried over; an untouched weight's stored tensors copied as they are (`unchanged`), so
  only updated weights are re-quantized;
  config.json keeps the base's `quantization_config`.
* Bound to a 16-bit base (`--quantize fp8`), it writes the layout that base's consumers load: an HF model
  folder gets transformers' FineGrainedFP8 layout (128×128 blocks, `quant_method: "fp8"`), a single
  .safetensors file ComfyUI's scaled fp8 (`scale_weight` per tensor, `scaled_fp8` marker). Linear weights
  only (loraport.quant.quantizer's eligibility rule); block layout also needs both dimensions divisible by 128,
  as transformers' own quantizer does; the rest stays 16-bit and is listed in `modules_to_not_convert`.
"""

from __future__ import annotations

import torch

from loraport.errors import BadInputError
from loraport.quant import fp8 as F
from loraport.quant.fp8_spec import MARKER, Fp8Spec
from loraport.quant.metrics import finite, record_delta, rel_error
from loraport.quant.quantizer import METRIC_ELEMS
from loraport.quant.writeback import WritebackQuantizer

BLOCK = (128, 128)
_TILED = ("group", "ct-block")  # compressed-tensors scales per tile (spec.block)


class Fp8Quantizer(WritebackQuantizer):
    name = "fp8"
    bits = 8

    def __init__(self, compute_dtype=None, dtype=None, metrics: bool = True, source=None, **unknown):
        """`source`: an fp8 base (loraport.quant.fp8_checkpoint.Fp8Checkpoint) whose layout is written back."""
        super().__init__(compute_dtype, dtype, metrics, source, **unknown)
        self._explicit_dtype = compute_dtype is not None or dtype is not None
        self.specs: dict[str, Fp8Spec] = dict(source.specs) if source is not None else {}
        self.scheme: str | None = None  # for a 16-bit base: "block" or "scaled"
        self.marker_prefix = ""

    # --- protocol ----------------------------------------------------------------------------------
    def bind(self, base) -> None:
        if self.src is not None:
            return
        own = base.own_layout()  # --quantize fp8 on an fp8 base: its own layout
        if isinstance(own, Fp8Quantizer):
            self.src, self.specs = own.src, own.specs
            return
        super().bind(base)
        self._from_quantized = False
        if base.kind == "hf-folder":
            self.scheme = "block"
        elif base.kind == "safetensors-file":
            self.scheme = "scaled"
        else:
            raise BadInputError(f"{base.root}: --quantize fp8 writes an HF model folder (FineGrainedFP8 blocks) or a "
                                f"single .safetensors file (ComfyUI scaled fp8); a diffusers folder has no fp8 "
                                f"layout its loader reads: merge into the component's single file instead")
        first = next((n for n in base.names() if self._eligible(n, tuple(base.info(n).shape),
                                                                base.layer_hint(n))[0]), "")
        self.marker_prefix = "model.diffusion_model." if first.startswith("model.diffusion_model.") else ""

    def _eligible(self, name, shape, hint):
        if self.src is not None:
            return (name in self.specs), "not stored as fp8 in the base"
        ok, why = super()._eligible(name, shape, hint)
        if ok and self.scheme == "block" and (shape[0] % BLOCK[0] or shape[1] % BLOCK[1]):
            return False, f"not a multiple of {BLOCK[0]}×{BLOCK[1]} blocks"
        return ok, why

    def _spec(self, name: str, shape: tuple[int, ...]) -> Fp8Spec:
        spec = self.specs.get(name)
        if spec is None:  # a 16-bit base: the scheme's spec, remembered for quantize()
            e4m3 = torch.float8_e4m3fn
            if self.scheme == "block":
                spec = Fp8Spec("block", name, e4m3, shape, {"scale": name[:-len("weight")] + "weight_scale_inv"},
                               torch.float32, F.block_grid(shape, BLOCK), BLOCK)
            else:
                spec = Fp8Spec("scaled", name, e4m3, shape, {"scale": name[:-len("weight")] + "scale_weight"},
                               torch.float32, ())
                if not any(MARKER in s.aux for s in self.specs.values()):
                    spec.aux["marker"] = self.marker_prefix + MARKER
            self.specs[name] = spec
        return spec

    def _entries(self, name, shape):
        spec = self._spec(name, shape)
        out = [(name, spec.fp8, tuple(shape))]
        if "scale" in spec.aux:
            out.append((spec.aux["scale"], spec.scale_dtype, tuple(spec.scale_shape)))
        for role in ("input_scale", "marker"):
            if role in spec.aux:
                n = spec.aux[role]
                if self.src is not None:
                    i = self.src.stored.info(n)
                    out.append((n, i.dtype, tuple(i.shape)))
                else:
                    out.append((n, spec.fp8, (0,)))
        return out

    def unchanged(self, name: str) -> list[torch.Tensor] | None:
        """An untouched weight of an fp8 base: its stored tensors, in entries() order (no re-quantization)."""
        if self.src is None or name not in self.specs:
            return None
        st = self.src.stored
        return [st.get(n) for n, _, _ in self._planned.get(name) or self._entries(name, self.specs[name].shape)]

    def _quantize(self, name, W32):
        spec = self._spec(name, tuple(W32.shape))
        codes, scale, stored = self._encode(spec, W32)
        out = {name: codes}
        if stored is not None:
            out[spec.aux["scale"]] = stored
        for role in ("input_scale", "marker"):
            if role in spec.aux:
                n = spec.aux[role]
                out[n] = self.src.stored.get(n) if self.src is not None else torch.empty(0, dtype=spec.fp8)
        return out, (codes, scale, spec)

    @staticmethod
    def _encode(spec: Fp8Spec, W32: torch.Tensor):
        """(codes, fp32 scale as the dequantizer uses it (finite check), scale as stored or None)."""
        if spec.kind == "plain":
            return F.quantize_plain(W32, spec.fp8), torch.stack(torch.aminmax(W32)), None
        if spec.kind == "block" and spec.ue8m0:
            q, s = F.quantize_block_ue8m0(W32, spec.block, spec.fp8)
            return q, s, F.e8m0_bytes(s) if spec.scale_dtype == torch.uint8 else s.to(spec.scale_dtype)
        if spec.kind == "block":
            q, s = F.quantize_block(W32, spec.block, spec.fp8)
            return q, s, s.to(spec.scale_dtype)
        if spec.kind in _TILED:
            q, s = F.quantize_ct_tiles(W32, spec.block, spec.scale_dtype, spec.fp8)
            return q, s.to(torch.float32), s
        if spec.kind == "scaled":
            per_row = len(spec.scale_shape) > 0 and spec.scale_shape[0] > 1
            q, s = F.quantize_scaled(W32, spec.fp8, per_row)
            if spec.scale_dtype != torch.float32:  # the stored scale is what ComfyUI multiplies by: divide by it
                s = s.to(spec.scale_dtype).to(torch.float32)
                q = F.cast_scaled(W32 / s, spec.fp8, s)
            return q, s, s.to(spec.scale_dtype).reshape(spec.scale_shape)
        q, s = F.quantize_ct(W32, spec.kind, spec.scale_dtype, spec.fp8)
        return q, s.to(torch.float32), s.reshape(spec.scale_shape)

    @staticmethod
    def _decode(codes: torch.Tensor, scale: torch.Tensor, spec: Fp8Spec, rows: torch.Tensor | None = None):
        """fp32 weights of `codes` (restricted to `rows` when given; `scale` as the dequantizer uses it)."""
        q = codes if rows is None else codes.index_select(0, rows)
        if spec.kind == "plain":
            return F.dequantize_plain(q)
        if spec.kind == "block" or spec.kind in _TILED:
            r = torch.arange(codes.shape[0], device=codes.device) if rows is None else rows
            per_row = scale.index_select(0, r // spec.block[0]).repeat_interleave(spec.block[1], 1)
            return F.to_float32(q) * per_row[:, : q.shape[1]]
        if scale.numel() == 1:
            return F.to_float32(q) * scale.reshape(())
        sc = scale.reshape(-1, 1)
        return F.to_float32(q) * (sc if rows is None else sc.index_select(0, rows))

    def _sample(self, spec: Fp8Spec, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The rows the report is computed on: all up to METRIC_ELEMS elements, else evenly spaced rows (whole
        128-row bands for block scales, so each sampled tile is complete)."""
        if len(shape) != 2 or shape[0] * shape[1] <= METRIC_ELEMS:
            return None
        rows, cols = shape
        band = spec.block[0] if spec.kind == "block" or spec.kind in _TILED else 1
        nb = -(-rows // band)
        k = max(1, min(nb, METRIC_ELEMS // (band * cols)))
        picked = torch.linspace(0, nb - 1, k).round().long().unique()
        r = (picked[:, None] * band + torch.arange(band)[None, :]).reshape(-1)
        return r[r < rows]

    def quantize(self, name: str, merged32: torch.Tensor, base32: torch.Tensor | None = None) -> dict:
        """The entries of `name` for the merged weight, and a report row (delta kept, codes changed) when the
        base is given."""
        shape = tuple(merged32.shape)
        if self.entries(name, shape) is None:
            raise ValueError(f"{name} was not planned for quantization")
        out, (codes, scale, spec) = self._quantize(name, merged32)
        if not bool(torch.isfinite(scale).all()):
            raise BadInputError(f"{name}: the merged weight has inf/NaN values; cannot quantize it to fp8 "
                                f"(check the adapter's scale and weight)")
        row = {"name": name, "shape": list(shape), "layout": f"{spec.kind} {str(spec.fp8).removeprefix('torch.')}",
               "bytes_before": merged32.numel() * 2,
               "bytes_after": sum(t.numel() * t.element_size() for t in out.values())}
        if self.metrics:
            self._metrics(row, merged32, codes, scale, spec, base32)
        self._rows.append(row)
        return {k: v.cpu() for k, v in out.items()}

    def _metrics(self, row: dict, W: torch.Tensor, codes, scale, spec: Fp8Spec, base32) -> None:
        rows = self._sample(spec, tuple(W.shape))
        if rows is not None:
            row["metric_rows"] = int(rows.numel())
            rows = rows.to(W.device)
        Ws = W if rows is None else W.index_select(0, rows)
        deq = self._decode(codes, scale, spec, rows)
        rel, snr = rel_error(Ws, deq)
        row.update(rel_error=finite(rel), snr_db=finite(snr))
        if base32 is None:
            return
        B = base32.to(W.device, torch.float32) if rows is None else \
            base32.index_select(0, rows.to(base32.device)).to(W.device, torch.float32)
        if self.src is not None:  # the base is the dequantized stored weight: compare with its stored codes
            deq_b, codes_b = B, self.src.stored.get(spec.weight).to(W.device)
            codes_b = codes_b if rows is None else codes_b.index_select(0, rows)
        else:  # a 16-bit base: its codes under the same rule (per-tensor scales need the whole tensor)
            per_tensor = spec.kind == "tensor" or (spec.kind == "scaled" and not (spec.scale_shape or (1,))[0] > 1)
            whole = rows is not None and per_tensor
            cb, sb, _ = self._encode(spec, base32.to(W.device, torch.float32) if whole else B)
            deq_b = self._decode(cb, sb, spec, rows if whole else None)
            codes_b = cb.index_select(0, rows) if whole else cb
        q = codes if rows is None else codes.index_select(0, rows)
        record_delta(row, deq, deq_b, Ws - B,
                     codes_changed=round(float((q.view(torch.uint8) != codes_b.view(torch.uint8)).float().mean()), 6))

    def _config_16bit(self, cfg: dict) -> dict:
        if self.scheme == "block":
            cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                          "weight_block_size": list(BLOCK),
                                          "modules_to_not_convert": self.skipped_modules()}
        return cfg
