"""Tiny GGUF LLM bases for the tests, written by the real producer library (gguf-py's GGUFWriter and
gguf.quants) the way llama.cpp's convert_hf_to_gguf.py lays out a Llama: its tensor names, q/k rows permuted
for llama.cpp's RoPE (LlamaModel.permute, restated here in numpy), the llama.* hyper-parameters and a
tokenizer vocabulary in the metadata (so a metadata round trip covers string, float and int arrays)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

LLAMA = Path(__file__).resolve().parent.parent / "fixtures" / "llm" / "bases" / "llama"
# HF module -> llama.cpp tensor (per block), as convert_hf_to_gguf's tensor map spells them
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in GLOBAL:
        return GLOBAL[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{BLOCK[rest.removesuffix('.weight')]}.weight"


# where a k-quant (or IQ4_XS) block keeps its fp16 super-block scales (ggml-common.h block_q4_K / block_q6_K /
# block_iq4_xs)
K_SCALES = {"Q4_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,)}


def _k_blocks(shape: tuple, qtype: str, rng) -> np.ndarray:
    """Valid k-quant bytes without a k-quant quantizer (gguf-py has none): random codes and sub-scales, the
    fp16 super-block scales set to small finite values. gguf.quants dequantizes them (the oracle)."""
    qt = gguf.GGMLQuantizationType[qtype]
    blk, nbytes = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (int(np.prod(shape)) // blk, nbytes), dtype=np.uint8)
    for off in K_SCALES[qtype]:
        raw[:, off:off + 2] = (rng.uniform(1e-4, 4e-4, (raw.shape[0], 1))).astype(np.float16).view(np.uint8)
    return raw.reshape(*shape[:-1], shape[-1] // blk * nbytes)


def make_llama_gguf(out: Path, qtype: str = "Q8_0", weights: dict | None = None, norm_type: str = "F32",
                    model: Path = LLAMA) -> Path:
    """The llama of folder `model` (default: the fixture) as GGUF: 2-D weights in `qtype` (a k-quant: random
    valid blocks instead of the model's weights), norms in `norm_type`. `weights` overrides the HF tensors."""
    cfg = json.loads((model / "config.json").read_text())
    ws = weights or load_file(str(model / "model.safetensors"))
    rng = np.random.default_rng(0)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(cfg["hidden_size"] // nh)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(cfg["vocab_size"])])
    w.add_token_scores([float(-i) for i in range(cfg["vocab_size"])])
    w.add_token_types([1] * cfg["vocab_size"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for hf in sorted(ws, key=lambda n: (gguf_name(n).startswith("blk"), gguf_name(n))):
        t = np.ascontiguousarray(ws[hf], dtype=np.float32)
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            t = llama_permute(t, nh if "q_proj" in hf else nkv)
        # convert_hf_to_gguf falls back to F16 where a row is not a whole number of blocks (down_proj: 48)
        kind = qtype if t.ndim == 2 and t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0] == 0 \
            else ("F16" if t.ndim == 2 else norm_type)
        qt = gguf.GGMLQuantizationType[kind]
        data = _k_blocks(t.shape, kind, rng) if kind in K_SCALES else gguf.quants.quantize(t, qt)
        w.add_tensor(gguf_name(hf), data, raw_shape=data.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
