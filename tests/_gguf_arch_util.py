"""Tiny transformers models of the architectures llama.cpp's GGUF name map covers, a PEFT LoRA on each, and
llama.cpp's own convert_lora_to_gguf.py as the oracle of what a GGUF adapter of it holds.

The converter is found through LORAPORT_LLAMACPP (a llama.cpp checkout, or the `vendor/llama.cpp` folder of
the llama-cpp-python sdist: `pip download llama-cpp-python --no-deps --no-binary :all:`); nothing is fetched.
The recorded oracle (fixtures/gguf_archs/oracle.json: names, shapes, architecture, alpha per arch) is made
by `python fixtures/make_fixtures.py gguf_archs` with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT / "fixtures" / "gguf_archs" / "oracle.json"
_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
# DeepSeek MLA without kv_b_proj (split per head by the converter: no GGUF LoRA form). No MLP: PEFT 0.21 turns
# gate/up/down_proj on DeepSeek into target_parameters on the fused routed experts (`mlp.experts`), which
# llama.cpp's converter cannot read ("Unprocessed experts")
_MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]

# name -> (transformers config class, config overrides, LoRA target modules)
ARCHS: dict[str, tuple[str, dict, list[str]]] = {
    "llama": ("LlamaConfig", dict(intermediate_size=48), _ATTN + _MLP),
    "gemma2": ("Gemma2Config", dict(intermediate_size=48), _ATTN + _MLP),
    "gemma3": ("Gemma3TextConfig", dict(intermediate_size=48, sliding_window=16), _ATTN + _MLP),
    "phi3": ("Phi3Config", dict(intermediate_size=48, pad_token_id=0), ["qkv_proj", "o_proj", "gate_up_proj",
                                                                       "down_proj"]),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
                _ATTN),
    "llama4_text": ("Llama4TextConfig", dict(intermediate_size=16, intermediate_size_mlp=48, num_local_experts=2,
                                             interleave_moe_layer_step=2, moe_layers=[1],
                                             no_rope_layers=[1, 1], attention_chunk_size=16),
                    _ATTN + _MLP),
    "glm": ("GlmConfig", dict(intermediate_size=48, pad_token_id=0), _ATTN + ["gate_up_proj", "down_proj"]),
    "glm4": ("Glm4Config", dict(intermediate_size=48, pad_token_id=0), _ATTN + ["gate_up_proj", "down_proj"]),
    "granite": ("GraniteConfig", dict(intermediate_size=48), _ATTN + _MLP),
    "smollm3": ("SmolLM3Config", dict(intermediate_size=48, pad_token_id=0), _ATTN + _MLP),
    "olmo2": ("Olmo2Config", dict(intermediate_size=48, pad_token_id=0), _ATTN + _MLP),
    "starcoder2": ("Starcoder2Config", dict(intermediate_size=48), _ATTN + ["c_fc", "c_proj"]),
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=48, moe_intermediate_size=8, n_routed_experts=4,
                                             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                             q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                                             qk_rope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),
                    _MLA),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=48, moe_intermediate_size=8, n_routed_experts=4,
                                             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                             q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                                             qk_rope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),
                    _MLA),
}


def build(arch: str, out: Path, seed: int = 7, targets: list[str] | None = None) -> tuple[Path, Path]:
    """A tiny random base of `arch` and a PEFT LoRA (r=4, alpha=8, random B) on it: (base dir, adapter dir)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cls, over, default = ARCHS[arch]
    targets = targets or default
    cfg = getattr(transformers, cls)(**{**_SMALL, **over})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    base, adapter = out / f"{arch}_base", out / f"{arch}_lora"
    model.save_pretrained(base)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    pm.save_pretrained(adapter)
    return base, adapter


def converter() -> Path | None:
    """llama.cpp's convert_lora_to_gguf.py, if LORAPORT_LLAMACPP points at a tree that has it."""
    root = os.environ.get("LORAPORT_LLAMACPP")
    script = Path(root) / "convert_lora_to_gguf.py" if root else None
    return script if script is not None and script.is_file() else None


def bench_script(name: str):
    """bench/<name>.py as a module: the llama.cpp runtime checks' work and tolerances live there, and their slow
    tests and the bench scripts that reuse each other's runners load it by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def llamacpp_tree() -> Path | None:
    """LORAPORT_LLAMACPP, if it points at a llama.cpp tree with convert_hf_to_gguf.py (the base converter of the
    llama.cpp runtime checks: tests/test_gguf_llamacpp_parity.py, test_gguf_merged_llamacpp.py and their bench/)."""
    root = Path(os.environ.get("LORAPORT_LLAMACPP", ""))
    return root if (root / "convert_hf_to_gguf.py").is_file() else None


def llamacpp_or_skip() -> Path:
    """The llama.cpp tree for a runtime test, or a skip naming what is missing (llama-cpp-python, the tree, or
    sentencepiece, installed or in LORAPORT_LLAMACPP_PYTHONPATH)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    root = llamacpp_tree()
    if root is None:
        pytest.skip("LORAPORT_LLAMACPP does not point at a llama.cpp tree with convert_hf_to_gguf.py")
    extra = os.environ.get("LORAPORT_LLAMACPP_PYTHONPATH", "")
    if importlib.util.find_spec("sentencepiece") is None and not (Path(extra) / "sentencepiece").is_dir():
        pytest.skip("sentencepiece (installed or in LORAPORT_LLAMACPP_PYTHONPATH) is needed for the tokenizer")
    return root


def llamacpp_env() -> dict[str, str]:
    """The environment llama.cpp's convert_hf_to_gguf.py runs in: not our PYTHONPATH (it has its own gguf-py), but
    LORAPORT_LLAMACPP_PYTHONPATH when set (e.g. where sentencepiece is, which the converter imports)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if os.environ.get("LORAPORT_LLAMACPP_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["LORAPORT_LLAMACPP_PYTHONPATH"]
    return env


def run_oracle(script: Path, base: Path, adapter: Path, out: Path) -> subprocess.CompletedProcess:
    """The real converter, f32 output, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # its own vendored gguf-py, not loraport's tree
    return subprocess.run([sys.executable, str(script), "--base", str(base), "--outtype", "f32",
                           "--outfile", str(out), str(adapter)], capture_output=True, text=True, env=env,
                          timeout=600)


def summary(path: Path) -> dict:
    """What a GGUF adapter holds, as the oracle is recorded: architecture, alpha, {tensor: shape}."""
    import gguf

    r = gguf.GGUFReader(str(path))
    f = r.fields

    def val(key):
        fld = f[key]
        v = fld.parts[fld.data[0]]
        return bytes(v).decode() if fld.types[0] == gguf.GGUFValueType.STRING else float(v[0])

    return {"arch": val("general.architecture"), "alpha": val("adapter.lora.alpha"),
            "tensors": {t.name: [int(x) for x in reversed(t.shape.tolist())] for t in r.tensors}}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    import gguf

    return {t.name: torch.from_numpy(t.data.copy()).float().reshape([int(x) for x in reversed(t.shape.tolist())])
            for t in gguf.GGUFReader(str(path)).tensors}


def load_oracle() -> dict:
    return json.loads(ORACLE.read_text())
