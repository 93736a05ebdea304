"""A model over 2 GB (fp32) is exported with external data, passes onnx.checker by path, loads in
onnxruntime and computes what transformers computes. Slow: writes ~5 GB."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tests._onnx_util import feeds, hf_model, max_abs, ort_run, torch_logits, workdir


def _wide_llama(folder):
    from loraport.safetensors_io import StreamingWriter

    cfg = dict(vocab_size=256, hidden_size=4096, intermediate_size=11008, num_hidden_layers=3,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=64)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{k}.weight"] = (h, h)
        shapes.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    w = StreamingWriter(folder / "model.safetensors", [(k, torch.float32, s) for k, s in shapes.items()])
    for k, s in shapes.items():
        w.write(k, torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02)
    w.close()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "tie_word_embeddings": False, **cfg}))
    return sum(int(np.prod(s)) for s in shapes.values()) * 4


@pytest.mark.slow
def test_over_2gb_model_written_with_external_data_loads():
    from loraport.onnx import export_onnx

    d = workdir("large")
    nbytes = _wide_llama(d / "base")
    assert nbytes > 2 * 2**30
    out = d / "onnx"
    export_onnx(d / "base", [], out)
    assert (out / "model.onnx").stat().st_size < 10 * 2**20
    assert (out / "model.onnx.data").stat().st_size >= nbytes
    onnx.checker.check_model(str(out / "model.onnx"))
    f = feeds(1, 5, vocab=256, seed=1)
    got = ort_run(out / "model.onnx", f)
    ref = torch_logits(hf_model(d / "base"), f)
    assert max_abs(got, ref) <= 1e-4
