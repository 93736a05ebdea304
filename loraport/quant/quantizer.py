"""The quantizers the merge engine calls (protocol in loraport/quant/__init__.py): which tensors get
quantized, the exact tensors bitsandbytes + transformers load, config.json's `quantization_config`, and a
per-layer quality report.

Which tensors: 2-D `*.weight` tensors of Linear layers. Embeddings and output heads (name table below),
GPT-2 Conv1D weights (stored transposed), odd-sized weights and everything not 2-D stay unquantized; every
unquantized 2-D weight's module is listed in `llm_int8_skip_modules` (plus "lm_head", which transformers
only skips by default when the list is empty), so transformers builds a plain Linear for it.
"""

from __future__ import annotations

import math
import re

import torch

from loraport.errors import BadInputError
from loraport.quant import bnb_layout as L
from loraport.quant.blockwise import check_blocksize, dequantize_4bit, dequantize_absmax, quantize_4bit, \
    quantize_absmax
from loraport.quant.metrics import ERASED_BELOW, finite, record_delta, rel_error
from loraport.quant.rowwise import FP16_MAX, dequantize_int8, quantize_int8

# 2-D weights that are not Linear layers (or are output heads transformers keeps in full precision), by the
# last module name. One line per spelling, with the families that use it.
NOT_LINEAR: tuple[tuple[str, str], ...] = (
    ("lm_head", "most causal LMs (output head)"),
    ("embed_out", "GPT-NeoX / Pythia (output head)"),
    ("output", "original LLaMA / Mistral checkpoints (output head)"),
    ("embed_tokens", "LLaMA, Mistral, Qwen, Gemma, OPT, BART"),
    ("embed_positions", "OPT, BART, Whisper"),
    ("embed_in", "GPT-NeoX / Pythia"),
    ("wte", "GPT-2, GPT-J, CodeGen"),
    ("wpe", "GPT-2"),
    ("word_embeddings", "BLOOM, Falcon, BERT"),
    ("position_embeddings", "BERT, CLIP"),
    ("token_type_embeddings", "BERT"),
    ("tok_embeddings", "original LLaMA, InternLM2"),
    ("shared", "T5, BART (tied embedding)"),
    ("relative_attention_bias", "T5 (Embedding)"),
    ("patch_embedding", "CLIP / SigLIP vision towers"),
)
_NOT_LINEAR = re.compile(r"(^|\.)(" + "|".join(re.escape(n) for n, _ in NOT_LINEAR) + r")\.weight$")
METRIC_ELEMS = 1 << 16  # report metrics on at most ~64K elements per tensor (whole rows, evenly spaced)
DTYPE_OPTIONS = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def _dtype_opt(v, what: str) -> torch.dtype | None:
    if v is None or isinstance(v, torch.dtype):
        return v
    if v not in DTYPE_OPTIONS:
        raise BadInputError(f"unknown {what} {v!r} (bf16, fp16 or fp32)")
    return DTYPE_OPTIONS[v]


class BnbQuantizer:
    """Shared logic; subclasses define the tensor layout (`_entries`, `_quantize`) and the config."""

    name = ""
    bits = 0
    # how to write 16-bit instead, in the "erased most of the adapter" warning
    write_16bit = "(omit --quantize) or re-quantize from the original weights with --fp16-base"

    def __init__(self, compute_dtype=None, dtype=None, metrics: bool = True):
        # compute dtype: what transformers dequantizes to and computes in (the base model's dtype by default)
        self.compute_dtype = _dtype_opt(compute_dtype, "compute dtype") or _dtype_opt(dtype, "dtype")
        if self.compute_dtype is None:
            self.compute_dtype = torch.bfloat16
        self.metrics = metrics
        self._planned: dict[str, list] = {}
        self._skipped: dict[str, str] = {}  # module -> why
        self._rows: list[dict] = []
        self._from_quantized = False

    # --- protocol ----------------------------------------------------------------------------------
    def bind(self, base) -> None:
        """Optional: learn the base's dtype (the default compute dtype) and whether it was itself quantized."""
        self._from_quantized = bool(getattr(base, "specs", None))
        dts = [base.info(n).dtype for n in base.names() if self._eligible(n, tuple(base.info(n).shape), None)[0]]
        dts = [d for d in dts if d in (torch.float16, torch.bfloat16, torch.float32)]
        if dts and not getattr(self, "_explicit_dtype", False):
            self.compute_dtype = max(set(dts), key=dts.count)

    def entries(self, name: str, shape: tuple[int, ...], hint: str | None = None):
        if name in self._planned:
            return self._planned[name]
        ok, why = self._eligible(name, shape, hint)
        if not ok:
            if len(shape) == 2 and name.endswith(".weight"):
                self._skipped[name.removesuffix(".weight")] = why
            return None
        ents = self._entries(name, tuple(shape))
        self._planned[name] = ents
        return ents

    def unchanged(self, name: str) -> list[torch.Tensor] | None:
        """The stored tensors of an untouched weight when the base already has this layout (None: quantize it)."""
        return None

    def quantize(self, name: str, merged32: torch.Tensor, base32: torch.Tensor | None = None) -> dict:
        shape = tuple(merged32.shape)
        if self.entries(name, shape) is None:
            raise ValueError(f"{name} was not planned for quantization")
        out, full = self._quantize(name, merged32)
        if not bool(torch.isfinite(full[1]).all()):  # absmax / SCB: any inf/NaN in the weight shows there
            raise BadInputError(f"{name}: the merged weight has inf/NaN values; cannot quantize it "
                                f"(check the adapter's scale and weight)")
        row = {"name": name, "shape": list(shape), "bytes_before": merged32.numel() * _itemsize(self.compute_dtype),
               "bytes_after": sum(t.numel() * t.element_size() for t in out.values())}
        if self.metrics:
            rows = self._metric_rows(shape)
            if rows is not None:
                row["metric_rows"] = int(rows.numel())
            W = merged32 if rows is None else merged32.index_select(0, rows)
            if rows is not None and getattr(self, "double_quant", False):
                # sampled rows + double quantization: quantize the sample itself, so the merged and the base
                # sample share one procedure (their absmax statistics are quantized over the same rows)
                full, rows_read = self._quantize(name, W)[1], None
            else:
                rows_read = rows
            deq, codes = self._reconstruct(full, rows_read)
            rel, snr = rel_error(W, deq)
            row.update(rel_error=finite(rel), snr_db=finite(snr))
            if base32 is not None:
                # any float dtype: only the sampled rows are upcast
                B = (base32 if rows is None else base32.index_select(0, rows)).to(W.device, torch.float32)
                deq_b, codes_b = self._reconstruct(self._quantize(name, B)[1], None)
                record_delta(row, deq, deq_b, W - B, codes_changed=round(self._changed(codes, codes_b), 6))
        self._rows.append(row)
        return {k: v.cpu() for k, v in out.items()}

    def report(self) -> list[dict]:
        rows = list(self._rows)
        if not rows:
            return rows
        upd = [r["delta_retained"] for r in rows if r.get("delta_retained") is not None]
        total = {"name": "(total)", "tensors": len(rows),
                 "bytes_before": sum(r["bytes_before"] for r in rows),
                 "bytes_after": sum(r["bytes_after"] for r in rows)}
        errs = [r["rel_error"] for r in rows if r.get("rel_error") is not None]
        if errs:
            total["rel_error_max"] = max(errs)
            total["rel_error_mean"] = round(sum(errs) / len(errs), 6)
        if upd:
            med = sorted(upd)[len(upd) // 2]
            erased = sum(1 for s in upd if s < ERASED_BELOW)
            surv = sorted(r["delta_survival"] for r in rows if r.get("delta_survival") is not None)
            total.update(updated_tensors=len(upd), delta_retained_median=med,
                         delta_survival_median=surv[len(surv) // 2] if surv else None, erased_tensors=erased)
            if erased * 2 > len(upd):
                total["warning"] = (
                    f"re-quantizing erased most of the adapter: {erased}/{len(upd)} updated tensors keep less "
                    f"than {ERASED_BELOW:.0%} of their delta (median kept {med:.0%}). Write 16-bit instead "
                    f"{self.write_16bit}")
            elif self._from_quantized:
                total["warning"] = (
                    f"re-quantized from an already-quantized base: median {med:.0%} of the adapter kept; "
                    f"--fp16-base with the original weights keeps more")
        rows.append(total)
        return rows

    def skipped_modules(self) -> list[str]:
        return sorted(set(self._skipped) | {"lm_head"})

    # --- helpers -------------------------------------------------------------------------------------
    def _eligible(self, name: str, shape: tuple[int, ...], hint: str | None) -> tuple[bool, str]:
        if len(shape) != 2 or not name.endswith(".weight"):
            return False, "not a 2-D weight"
        if _NOT_LINEAR.search(name):
            return False, "embedding or output head"
        if hint == "conv1d":
            return False, "Conv1D (stored transposed)"
        if math.prod(shape) % 2 or min(shape) == 0:
            return False, "odd or empty size"
        return True, ""

    def _entries(self, name, shape):
        raise NotImplementedError

    @staticmethod
    def _changed(a: torch.Tensor, b: torch.Tensor) -> float:
        raise NotImplementedError

    def _metric_rows(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Rows the report's metrics are computed on: all of them up to METRIC_ELEMS elements, else evenly
        spaced rows worth about METRIC_ELEMS (exact for those rows: they are read from the written codes)."""
        rows, cols = shape
        if rows * cols <= METRIC_ELEMS or not self._row_aligned(cols):
            return None
        k = max(1, METRIC_ELEMS // cols)
        return torch.linspace(0, rows - 1, k).round().long().unique()

    def _row_aligned(self, cols: int) -> bool:
        return True

    def _quantize(self, name, W32):
        raise NotImplementedError

    def _reconstruct(self, full, rows):
        raise NotImplementedError


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


class FourBitQuantizer(BnbQuantizer):
    bits = 4

    def __init__(self, quant_type: str, blocksize: int = 64, double_quant: bool = False, compute_dtype=None,
                 dtype=None, metrics: bool = True, **unknown):
        if unknown:
            raise BadInputError(f"unknown {quant_type} option(s): {', '.join(sorted(unknown))}")
        try:
            check_blocksize(int(blocksize))
        except (TypeError, ValueError):
            raise BadInputError(f"--blocksize {blocksize!r}: use a power of two from 32 to 4096 (64 is what "
                                f"bitsandbytes and transformers use)") from None
        super().__init__(compute_dtype, dtype, metrics)
        self._explicit_dtype = compute_dtype is not None or dtype is not None
        self.name = self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)

    def _entries(self, name, shape):
        return L.entries_4bit(name, shape, self.quant_type, self.blocksize, self.double_quant, self.compute_dtype)

    def _quantize(self, name, W32):
        """(output tensors, (packed, dequantized absmax, shape)) for one weight."""
        packed, absmax = quantize_4bit(W32, self.quant_type, self.blocksize)
        nested = quantize_absmax(absmax) if self.double_quant else None
        out = L.tensors_4bit(name, tuple(W32.shape), self.quant_type, self.blocksize, self.compute_dtype,
                             packed, absmax, nested)
        return out, (packed, absmax, nested, tuple(W32.shape))

    def _row_aligned(self, cols: int) -> bool:
        return cols % self.blocksize == 0 and cols % 2 == 0

    def _reconstruct(self, full, rows):
        """(fp32 dequantized weight, packed codes), restricted to `rows` when given."""
        packed, absmax, nested, shape = full
        am = dequantize_absmax(*nested) if nested is not None else absmax
        if rows is not None:
            packed = packed.view(shape[0], -1).index_select(0, rows)
            am = am.view(shape[0], -1).index_select(0, rows).reshape(-1)
            shape = (rows.numel(), shape[1])
        return dequantize_4bit(packed, am, self.quant_type, self.blocksize, shape), packed

    @staticmethod
    def _changed(a: torch.Tensor, b: torch.Tensor) -> float:
        x = a.reshape(-1) ^ b.reshape(-1)
        return float(((x >> 4) != 0).sum() + ((x & 0x0F) != 0).sum()) / (2 * x.numel())

    def config_update(self, config: dict) -> dict:
        cfg = dict(config)
        cfg["quantization_config"] = L.quantization_config(4, quant_type=self.quant_type,
                                                           double_quant=self.double_quant,
                                                           compute_dtype=self.compute_dtype,
                                                           skip_modules=self.skipped_modules())
        return cfg


class Int8Quantizer(BnbQuantizer):
    name = "int8"
    bits = 8

    def __init__(self, compute_dtype=None, dtype=None, metrics: bool = True, **unknown):
        if unknown:
            raise BadInputError(f"unknown int8 option(s): {', '.join(sorted(unknown))}")
        super().__init__(compute_dtype, dtype, metrics)
        self._explicit_dtype = compute_dtype is not None or dtype is not None

    def _entries(self, name, shape):
        return L.entries_int8(name, shape)

    def _quantize(self, name, W32):
        CB, SCB = quantize_int8(W32)
        if bool(torch.isinf(SCB).any()):  # the fp16 copy overflowed
            raise BadInputError(f"{name}: values beyond ±{FP16_MAX:g} cannot be stored by LLM.int8 (it quantizes "
                                f"an fp16 copy); use --quantize nf4 or a 16-bit output")
        return L.tensors_int8(name, CB, SCB), (CB, SCB)

    def _reconstruct(self, full, rows):
        CB, SCB = full
        if rows is not None:
            CB, SCB = CB.index_select(0, rows), SCB.index_select(0, rows)
        return dequantize_int8(CB, SCB), CB

    @staticmethod
    def _changed(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a != b).float().mean())

    def config_update(self, config: dict) -> dict:
        cfg = dict(config)
        cfg["quantization_config"] = L.quantization_config(8, skip_modules=self.skipped_modules())
        return cfg
