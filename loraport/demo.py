"""`loraport demo`: the main job end to end on a tiny built-in model, offline.

Builds a tiny Llama-architecture model (an HF folder transformers can load) and a PEFT-layout LoRA adapter
(rsLoRA on attention, plain LoRA on the MLP, a DoRA-free mix of ranks), merges them with the streaming
engine, then checks parity by running inference: the reference is the *unmerged* model (base weights plus
the LoRA branch computed separately, x·Aᵀ·Bᵀ·s) and the artifact is the merged folder, both in fp32 on the
same token batch.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

from loraport.adapter import Adapter, LoraDelta
from loraport.formats.peft import PeftFormat
from loraport.safetensors_io import SafetensorsFile, save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build_base(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    c = CONFIG
    g = torch.Generator().manual_seed(seed)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd

    def rnd(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    sd = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd.update({p + "input_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
                   p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                   p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                   p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
                   p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                   p + "mlp.down_proj.weight": rnd(h, i)})
    sd["model.norm.weight"] = torch.ones(h)
    sd["lm_head.weight"] = rnd(v, h)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "model.safetensors", {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return sd


def build_adapter(folder: Path, base: dict[str, torch.Tensor], seed: int = 1) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    deltas = []
    for n in range(CONFIG["num_hidden_layers"]):
        for lin in LINEARS:
            name = f"model.layers.{n}.{lin}.weight"
            out, inp = base[name].shape
            r = 8 if "attn" in lin else 4
            alpha = 16.0
            rs = "attn" in lin  # rsLoRA on attention: alpha/sqrt(r)
            deltas.append(LoraDelta(name, A=torch.randn(r, inp, generator=g) / math.sqrt(inp),
                                    B=torch.randn(out, r, generator=g) * 0.05,
                                    scale=alpha / math.sqrt(r) if rs else alpha / r, alpha=alpha,
                                    scale_rule="alpha/sqrt(r)" if rs else "alpha/r", transpose=False,
                                    layer="linear"))
    adapter = Adapter(deltas, "peft", str(folder), config={"task_type": "CAUSAL_LM"})
    PeftFormat.write(adapter, folder)
    return adapter


# --------------------------------------------------------------------------- a tiny Llama forward (fp32)
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(pos.float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def forward(sd: dict[str, torch.Tensor], ids: torch.Tensor, lora: dict | None = None) -> torch.Tensor:
    """Logits of the tiny Llama. `lora` maps a weight name to (A, B, scale): the branch is added unmerged."""
    c = CONFIG
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // nh
    eps, theta = c["rms_norm_eps"], c["rope_theta"]

    def lin(x, name):
        y = x @ sd[name].T
        if lora and name in lora:
            A, B, s = lora[name]
            y = y + (x @ A.T) @ B.T * s
        return y

    b, t = ids.shape
    pos = torch.arange(t)
    x = sd["model.embed_tokens.weight"][ids]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj.weight").view(b, t, nh, hd).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj.weight").view(b, t, nkv, hd).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj.weight").view(b, t, nkv, hd).transpose(1, 2)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + lin(att.transpose(1, 2).reshape(b, t, -1), p + "self_attn.o_proj.weight")
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        m = torch.nn.functional.silu(lin(h, p + "mlp.gate_proj.weight")) * lin(h, p + "mlp.up_proj.weight")
        x = x + lin(m, p + "mlp.down_proj.weight")
    return _rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    d = (ref - got).abs()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "cosine": cos,
            "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item()}


def run_demo(workdir: str | None = None, device: str = "auto", tolerance: float = 1e-4) -> dict:
    from loraport.merging import merge

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraport-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        base_dir, ad_dir, out_dir = root / "tiny-llama", root / "tiny-lora", root / "tiny-llama-merged"
        base = build_base(base_dir)
        adapter = build_adapter(ad_dir, base)
        rep = merge(base_dir, [(ad_dir, 1.0)], out_dir, device=device, overwrite=True)
        f = SafetensorsFile(out_dir / "model.safetensors")
        merged = f.load_all()
        f.close()
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
        lora = {d.target: (d.A, d.B, d.scale) for d in adapter.deltas}
        with torch.no_grad():
            ref = forward(base, ids, lora)
            got = forward(merged, ids)
            base_logits = forward(base, ids)
        parity = compare(ref, got)
        parity["adapter_effect_max_abs"] = (ref - base_logits).abs().max().item()
        hf = _transformers_check(out_dir, ids, got)
        result = {
            "model": "tiny Llama (2 layers, hidden 64, vocab 256)", "adapter_targets": len(adapter.deltas),
            "tensors_updated": rep["tensors_updated"], "device": rep["device"], "merge_seconds": rep["seconds"],
            "parity": parity, "transformers": hf, "tolerance": tolerance,
            "passed": parity["max_abs"] <= tolerance and parity["adapter_effect_max_abs"] > 100 * tolerance
            and (hf is None or hf["max_abs"] <= tolerance),
            "seconds": round(time.perf_counter() - t0, 2), "workdir": str(root) if workdir else None,
        }
    return result


def _transformers_check(out_dir: Path, ids: torch.Tensor, ours: torch.Tensor) -> dict | None:
    """If transformers is installed, load the merged folder with it and compare to our forward."""
    try:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM
    except Exception:  # noqa: BLE001 - optional dependency
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, trust_remote_code=False,
                                                 local_files_only=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
    return compare(ours, logits)
