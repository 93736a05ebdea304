"""Tiny models and PEFT adapters for the extract / resize / combine tests, built locally with transformers
and PEFT (random init, fixed seeds, no downloads). Oracles are computed by PEFT at test time."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 64, inter: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, dtype="float32")
    return LlamaForCausalLM(cfg).eval()


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


def lora_model(model, r: int, seed: int, targets, alpha: float | None = None, **kw):
    """A PEFT model around a deep copy of `model` with a non-trivial (B ≠ 0) LoRA."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=targets,
                     init_lora_weights=False, **kw)
    return get_peft_model(copy.deepcopy(model), cfg)


def peft_deltas(pm, adapter: str = "default") -> dict[str, torch.Tensor]:
    """{base tensor name: ΔW} as PEFT computes it (get_delta_weight, scaling included)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and (adapter in mod.lora_A or adapter in mod.lora_embedding_A):
            out[f"{name}.weight"] = mod.get_delta_weight(adapter).detach().float()
    return out


def save_state(model, path: Path) -> Path:
    """Save a plain module's state dict as one .safetensors file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def read_delta(adapter_path: Path, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{target: ΔW} of a written adapter, loaded and merged by loraport's own delta math."""
    from loraport.formats import load_adapter

    ad = load_adapter(adapter_path)
    out = {}
    for d in ad.deltas:
        W = base_state[d.target].float()
        d = d.resolve(tuple(W.shape))
        out[d.target] = d.contribution(W)
    return out


def cli(*args):
    """Run `loraport` in-process (click's CliRunner); returns the Result (.stdout, .stderr, .exit_code)."""
    from click.testing import CliRunner

    from loraport.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def fp32_tol(ref_delta: torch.Tensor, weight: torch.Tensor, ulps: float = 4.0) -> float:
    """What 'equal to fp32 rounding' means for a recovered ΔW: a few ulps of the larger of the update's
    spectral norm (SVD round-off) and the weight it was added to (the subtraction W_tuned − W_base)."""
    eps = torch.finfo(torch.float32).eps
    smax = float(torch.linalg.matrix_norm(ref_delta.double().reshape(ref_delta.shape[0], -1), ord=2))
    return ulps * eps * (smax + float(weight.abs().max()))
