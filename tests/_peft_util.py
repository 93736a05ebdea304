"""Helpers shared by the PEFT fixture maker and the PEFT/core tests.

Holds the tiny model definitions (so the maker and the tests build the very same architectures), the
fixture locations, and small comparison utilities. Oracles are never stored here: tests compute them with
live PEFT (`PeftModel.merge_and_unload()`) at test time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "peft"

VOCAB = 128
SEED = 1234


# --- tiny model definitions ---------------------------------------------------------------------
def llama_config(dtype: str = "float32"):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       dtype=dtype)


def qwen2_config(dtype: str = "bfloat16"):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       use_sliding_window=False, dtype=dtype)


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


class TinyConvNet(nn.Module):
    """A diffusers-free conv model: two 3x3 convs, a 1x1 conv and a linear head. Saved as one .safetensors
    file whose keys are this module's state_dict keys."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 6)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.proj(x).mean(dim=(2, 3))
        return self.head(x)


def build_tokenizer():
    """A WordLevel tokenizer over VOCAB tokens, built locally (no download), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


# --- fixture access -----------------------------------------------------------------------------
def fx(*parts: str) -> Path:
    return FIXTURES.joinpath(*parts)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or of every *.safetensors in a folder (via the reference library)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def metadata(path: Path) -> dict[str, str]:
    """`__metadata__` of a safetensors file, read with the reference library."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# --- comparisons --------------------------------------------------------------------------------
def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (elementwise, fp32): 2**(floor(log2|x|) - 7); the smallest normal's
    spacing for 0."""
    ax = x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def ulps_bf16(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |got - ref| measured in bf16 ulps at the larger magnitude of the two."""
    g, r = got.float(), ref.float()
    if not g.numel():
        return 0.0
    ulp = bf16_ulp(torch.maximum(g.abs(), r.abs()))
    return ((g - r).abs() / ulp).max().item()


# --- running the CLI ------------------------------------------------------------------------------
def cli(*args: str):
    """Run `loraport` in-process with click's CliRunner; returns the Result (.stdout, .stderr, .exit_code)."""
    from click.testing import CliRunner

    from loraport.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def run_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LORAPORT_DEBUG", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "loraport", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env=env)


def read_json(p: Path):
    return json.loads(Path(p).read_text())


# --- live PEFT oracles ----------------------------------------------------------------------------
def base_kind(base: Path) -> str:
    return "conv" if Path(base).is_file() else "causal"


def load_base_model(base: Path, dtype: torch.dtype | None = None):
    """The base as a torch module: transformers for HF folders, TinyConvNet for the single conv file."""
    if base_kind(base) == "conv":
        m = TinyConvNet()
        m.load_state_dict(load_state(base), strict=True)
        return m.to(dtype or torch.float32).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype | None = None):
    """PEFT's own merge: PeftModel.from_pretrained(base, adapter).merge_and_unload()."""
    from peft import PeftModel

    model = load_base_model(base, dtype)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def sample_input(base: Path):
    g = torch.Generator().manual_seed(7)
    if base_kind(base) == "conv":
        return torch.randn(2, 3, 8, 8, generator=g)
    return torch.randint(3, VOCAB, (2, 12), generator=g)


@torch.no_grad()
def forward(model, x) -> torch.Tensor:
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out).float()
