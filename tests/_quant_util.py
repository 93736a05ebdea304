"""Helpers for the quantization tests: fixture paths, bitsandbytes (the oracle) imported quietly."""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "quant"
BF16 = FIX / "llama-bf16"
NF4_DQ = FIX / "llama-nf4-dq"
INT8 = FIX / "llama-int8"
GPT2_NF4 = FIX / "gpt2-nf4"
LORA = FIX / "lora-small"


def bnb_functional():
    """bitsandbytes.functional, without its import-time chatter."""
    warnings.filterwarnings("ignore")
    buf = io.StringIO()
    with redirect_stderr(buf), redirect_stdout(buf):
        F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle of these tests")
    return F


def quiet_model(path, **kw):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def bnb_dequantized_state(model) -> dict[str, torch.Tensor]:
    """Every weight of a transformers model loaded with bitsandbytes layers, dequantized by bitsandbytes."""
    F = bnb_functional()
    out = {}
    for n, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or not isinstance(w, torch.Tensor):
            continue
        if getattr(w, "quant_state", None) is not None:
            out[n + ".weight"] = F.dequantize_4bit(w.data, w.quant_state)
        elif w.dtype == torch.int8:
            out[n + ".weight"] = F.int8_vectorwise_dequant(w.data, w.SCB)
        else:
            out[n + ".weight"] = w.data
    return out


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()
