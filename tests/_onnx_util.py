"""Helpers for the ONNX and validate tests: exports cached once per test process, PEFT / transformers oracles,
onnxruntime runs. Oracles are computed live (PEFT's own forward on the unmerged adapter)."""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PEFT_FIX = ROOT / "fixtures" / "peft"
LLAMA = PEFT_FIX / "bases" / "llama"
GPT2 = PEFT_FIX / "bases" / "gpt2"
ADAPTERS = PEFT_FIX / "adapters"

_WORK = Path(tempfile.mkdtemp(prefix="loraport-onnx-tests-"))
atexit.register(shutil.rmtree, _WORK, True)


class LogitsOnly(torch.nn.Module):
    """A HF causal LM reduced to (input_ids, attention_mask) -> logits, for exporting a base with torch.onnx."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def workdir(name: str) -> Path:
    p = _WORK / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def feeds(batch: int = 2, seq: int = 9, vocab: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    ids = g.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    am = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos}


@functools.cache
def export(base: str, adapters: tuple[tuple[str, float], ...], **kw) -> Path:
    """One loraport ONNX export per distinct call, shared by every test module of the run."""
    from loraport.onnx import export_onnx

    opts = [f"{k}={v}" for k, v in sorted(kw.items())]
    key = "-".join([Path(base).parent.name, Path(base).name, *[Path(a).name for a, _ in adapters], *opts])
    out = _WORK / "exports" / key
    out.parent.mkdir(exist_ok=True)
    export_onnx(base, list(adapters), out, **kw)
    return out


def export_kw(base, adapters, **kw) -> Path:
    return export(str(base), tuple((str(a), float(w)) for a, w in adapters), **kw)


def ort_run(model: Path, f: dict, adapter: Path | None = None, qdq_level: str | None = "0") -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if qdq_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", qdq_level)
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in f.items() if k in names}
    if adapter is None:
        return sess.run(None, feed)[0]
    a = ort.LoraAdapter()
    a.Load(str(adapter))
    ro = ort.RunOptions()
    ro.add_active_adapter(a)
    out = sess.run(None, feed, ro)[0]
    del a
    return out


def hf_model(base: Path):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    m.config.use_cache = False
    return m.eval()


def torch_logits(model, f: dict) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(f["input_ids"]), attention_mask=torch.from_numpy(f["attention_mask"]),
                     use_cache=False).logits.numpy()


def peft_logits(base: Path, adapter: Path | None, f: dict) -> np.ndarray:
    """The oracle: transformers base + PEFT with the adapter unmerged (None: the base alone)."""
    m = hf_model(base)
    if adapter is not None:
        import peft

        m = peft.PeftModel.from_pretrained(m, str(adapter)).eval()
    return torch_logits(m, f)


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraport", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
