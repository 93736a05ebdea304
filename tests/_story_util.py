"""Helpers for tests/test_user_stories.py: the README recipes run as a user would, against the peers as oracles.

Oracles are computed live here (PEFT unmerged forwards, diffusers load_lora_weights + fuse_lora, bitsandbytes
loading through transformers, onnxruntime sessions, the gguf package's reader); nothing expected is stored.
"""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PEFT_FX = ROOT / "fixtures" / "peft"
SD_FX = ROOT / "fixtures" / "sd"
QUANT_FX = ROOT / "fixtures" / "quant"


def quiet():
    """Silence the peers' loggers and progress bars (they would drown the assertion messages)."""
    import logging

    warnings.filterwarnings("ignore")
    for name in ("transformers", "diffusers", "peft", "bitsandbytes", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dev dependency
        pass
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dev dependency
        pass


def cli(*args):
    """`loraport ...` in-process through click's CliRunner (stdout and stderr kept apart)."""
    from click.testing import CliRunner

    from loraport.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def ok(res, what: str) -> None:
    """Assert a CliRunner result exited 0, with everything a bug report needs otherwise."""
    assert res.exit_code == 0, (f"`loraport {what}` exited {res.exit_code}\nstderr: {res.stderr[-2000:]}\n"
                                f"exception: {res.exception!r}")


# --- causal LMs ------------------------------------------------------------------------------------
def token_ids(vocab: int, seed: int = 7, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_model(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    quiet()
    buf = io.StringIO()
    with redirect_stderr(buf), redirect_stdout(buf):
        return AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


@torch.no_grad()
def lm_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()


def peft_unmerged(base: Path, adapters: list[tuple[Path, float]], dtype=torch.float32):
    """The oracle: the base in transformers with every adapter loaded by PEFT, all active at once and *unmerged*,
    each one's LoRA scaling multiplied by its weight (so the forward is base + Σ wᵢ·sᵢ·BᵢAᵢ x)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = hf_model(base, dtype=dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
    for n, (p, _) in zip(names[1:], adapters[1:]):
        pm.load_adapter(str(p), adapter_name=n)
    if len(names) > 1:
        pm.base_model.set_adapter(names)
    for mod in pm.modules():
        if isinstance(mod, LoraLayer):
            for n, (_, w) in zip(names, adapters):
                if n in mod.scaling:
                    mod.scaling[n] *= w
    return pm.eval()


def peft_merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own fp32 merge (merge_and_unload) of one adapter, as a state dict."""
    from peft import PeftModel

    m = PeftModel.from_pretrained(hf_model(base, dtype=torch.float32), str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def diff_stats(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got − ref|, cosine) over all elements."""
    g, r = got.double().flatten(), ref.double().flatten()
    return (g - r).abs().max().item(), torch.nn.functional.cosine_similarity(g, r, dim=0).item()


# --- bitsandbytes ------------------------------------------------------------------------------------
def bnb_dequantized(model) -> dict[str, torch.Tensor]:
    """Every weight of a transformers model holding bitsandbytes layers, dequantized by bitsandbytes (fp32)."""
    buf = io.StringIO()
    with redirect_stderr(buf), redirect_stdout(buf):
        import bitsandbytes.functional as F
    out = {}
    for n, p in model.state_dict().items():
        out[n] = p
    for n, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and getattr(w, "quant_state", None) is not None:
            out[n + ".weight"] = F.dequantize_4bit(w.data, w.quant_state)
    return {k: v.float() for k, v in out.items() if k.endswith((".weight", ".bias")) and v.is_floating_point()}


# --- ONNX --------------------------------------------------------------------------------------------
def ort_logits(model: Path, ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    """onnxruntime (CPU) logits; `adapter` is an .onnx_adapter made active for this run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    ids_np = ids.numpy().astype(np.int64)
    feed = {"input_ids": ids_np, "attention_mask": np.ones_like(ids_np),
            "position_ids": np.broadcast_to(np.arange(ids_np.shape[1], dtype=np.int64), ids_np.shape).copy()}
    feed = {i.name: feed[i.name] for i in sess.get_inputs() if i.name in feed}
    if adapter is None:
        return torch.from_numpy(sess.run(["logits"], feed)[0]).float()
    a = ort.LoraAdapter()
    a.Load(str(adapter))
    ro = ort.RunOptions()
    ro.add_active_adapter(a)
    out = sess.run(["logits"], feed, ro)[0]
    del a
    return torch.from_numpy(out).float()


def corrupt_one_onnx_weight(folder: Path, name_part: str, value: float = 25.0) -> str:
    """Overwrite one element of the first external initializer whose name contains `name_part` in place
    (the copy's .data file), the way a bad disk or a bad tool would; returns the initializer's name."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        if name_part in init.name and init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            assert init.data_type == onnx.TensorProto.FLOAT, init.name
            with open(folder / info["location"], "r+b") as f:
                f.seek(int(info.get("offset", 0)))
                f.write(np.float32(value).tobytes())
            return init.name
    raise AssertionError(f"no external fp32 initializer named like {name_part!r} in {folder}")


def read_json(p: Path):
    return json.loads(Path(p).read_text())
