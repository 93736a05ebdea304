"""LLM adapter readers against their producers' layouts, with PEFT's own merge as the oracle.

Fixtures (fixtures/makers/llm.py): PEFT-made adapters on a tiny Llama, laid out as llama.cpp's
convert_lora_to_gguf.py (gguf-py names, q/k permute, token_embd transpose), mlx-lm (mlx does not run on
Linux x86, so files follow its documented layout), torchtune (Meta names and q/k row order) and ORT
(`onnxruntime.AdapterFormat`) write them.
"""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch

from loraport.errors import BadInputError
from loraport.formats import detect, load_adapter
from tests._llm_util import LLAMA, LLM, MOE, loraport_deltas, max_diff, peft_deltas

TOL = 1e-6


@pytest.mark.parametrize("src,peft,fmt", [
    ("gguf/llama_lora.gguf", "llama_lora", "gguf"),
    ("gguf/llama_embed.gguf", "llama_embed", "gguf"),
    ("mlx/llama_lora", "llama_lora", "mlx"),
    ("mlx/llama_dora", "llama_dora", "mlx"),
    ("torchtune/llama_lora", "llama_lora", "torchtune"),
    ("torchtune/llama_dora", "llama_dora", "torchtune"),
    ("onnx/llama_lora.onnx_adapter", "llama_lora", "onnx-adapter"),
])
def test_reader_matches_peft_merge(src, peft, fmt):
    path = LLM / src
    assert detect(path).name == fmt
    ours = loraport_deltas(path)
    ref = peft_deltas(str(LLM / "peft" / peft))
    assert max_diff(ours, ref) <= TOL


def test_gguf_without_base_keeps_gguf_names_and_raw_factors():
    """No base: GGUF names, GGUF row order; ΔW = alpha/r · B@A exactly as gguf's own GGUFReader sees it."""
    import gguf

    path = LLM / "gguf" / "llama_lora.gguf"
    ad = load_adapter(path)
    rd = gguf.GGUFReader(str(path))
    alpha = float(rd.get_field("adapter.lora.alpha").parts[-1][0])
    raw = {t.name: torch.from_numpy(np.array(t.data)).float() for t in rd.tensors}
    assert {d.target for d in ad.deltas} == {n[: -len(".lora_a")] for n in raw if n.endswith(".lora_a")}
    for d in ad.deltas:
        A, B = raw[d.target + ".lora_a"], raw[d.target + ".lora_b"]
        want = alpha / A.shape[0] * (B @ A)
        got = d.contribution(torch.zeros_like(want))
        assert float((got - want).abs().max()) <= TOL


def test_gguf_unpermute_matches_rope_semantics():
    """Attention scores are the oracle for the q/k row order: HF q/k with transformers' rotate-half RoPE must
    give the same q·k as GGUF-ordered rows with interleaved (Meta / llama.cpp) RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from loraport.checkpoint import Checkpoint

    ck = Checkpoint.open(LLAMA)
    cfg = ck.config
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    hf = load_adapter(LLM / "gguf" / "llama_lora.gguf", base=ck)
    raw = load_adapter(LLM / "gguf" / "llama_lora.gguf")
    for kind, n in (("q", nh), ("k", nkv)):
        d_hf = next(d for d in hf.deltas if d.target == f"model.layers.0.self_attn.{kind}_proj.weight")
        d_gg = next(d for d in raw.deltas if d.target == f"blk.0.attn_{kind}.weight")
        W_hf = d_hf.contribution(torch.zeros(n * hd, cfg["hidden_size"]))
        W_gg = d_gg.contribution(torch.zeros(n * hd, cfg["hidden_size"]))
        x = torch.randn(5, cfg["hidden_size"])
        pos = torch.arange(5).float()
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = pos[:, None] * inv[None]  # [T, hd/2]
        emb = torch.cat([ang, ang], -1)
        # HF: rotate-half on the HF rows
        y = (x @ W_hf.T).reshape(5, n, hd).transpose(0, 1)[None]
        y_hf, _ = apply_rotary_pos_emb(y, y, emb.cos()[None], emb.sin()[None])
        # Meta: complex rotation of interleaved pairs on the GGUF rows
        z = (x @ W_gg.T).reshape(5, n, hd // 2, 2)
        zc = torch.view_as_complex(z.contiguous()) * torch.polar(torch.ones_like(ang), ang)[:, None]
        z_meta = torch.view_as_real(zc).reshape(5, n, hd).transpose(0, 1)[None]
        s_hf = y_hf @ y_hf.transpose(-1, -2)
        s_meta = z_meta @ z_meta.transpose(-1, -2)
        assert float((s_hf - s_meta).abs().max()) <= 1e-4 * float(s_hf.abs().max())
    ck.close()


def test_mlx_alpha_era_config():
    path = LLM / "mlx" / "llama_alpha_era"
    ref = peft_deltas(str(LLM / "peft" / "llama_lora"))
    applied = loraport_deltas(_read(path, mlx_alpha="apply"))
    assert max_diff(applied, ref) <= TOL
    current = _read(path)
    assert any("alpha" in n for n in current.notes)
    assert max_diff(loraport_deltas(current), ref) > 1e-3  # current mlx-lm semantics: scale only


def _read(path, **opts):
    from loraport.checkpoint import Checkpoint

    return load_adapter(path, base=Checkpoint.open(LLAMA), **opts)


def test_mlx_switch_experts_per_expert_and_stacked(tmp_path):
    """LoRASwitchLinear onto (a) transformers' on-disk per-expert tensors and (b) the stacked gate_up_proj
    transformers ≥ 5 builds in memory: the merged models give the same logits."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from loraport.checkpoint import Checkpoint
    from loraport.merging import build_plan, merged_tensor

    ad_path = LLM / "mlx" / "qwen2moe_switch"
    raw = load_file(ad_path / "adapters.safetensors")
    scale = json.loads((ad_path / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    ck = Checkpoint.open(MOE)
    ad = load_adapter(ad_path, base=ck)
    per = {d.target: d for d in ad.deltas}
    # mlx-lm's fuse formula per expert: W_e + scale · lora_b[e] @ lora_a[e]
    a, b = raw["model.layers.0.mlp.switch_mlp.up_proj.lora_a"], raw["model.layers.0.mlp.switch_mlp.up_proj.lora_b"]
    for e in range(a.shape[0]):
        t = f"model.layers.0.mlp.experts.{e}.up_proj.weight"
        got = per[t].contribution(torch.zeros(b.shape[1], a.shape[2]))
        assert float((got - scale * b[e] @ a[e]).abs().max()) <= TOL
    plan = build_plan(ck, [(ad, 1.0)])
    merged_disk = {n: merged_tensor(plan, n) for n in ck.names()}
    # stacked base: what transformers holds in memory, saved as one safetensors file
    model = AutoModelForCausalLM.from_pretrained(MOE, dtype=torch.float32)
    stacked = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(stacked, tmp_path / "stacked.safetensors")
    ck2 = Checkpoint.open(tmp_path / "stacked.safetensors")
    ad2 = load_adapter(ad_path, base=ck2)
    assert any(d.kind == "lora-experts" for d in ad2.deltas)
    plan2 = build_plan(ck2, [(ad2, 1.0)])
    merged_stacked = {n: merged_tensor(plan2, n) for n in ck2.names()}
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    m1 = AutoModelForCausalLM.from_pretrained(MOE, dtype=torch.float32)
    m1.load_state_dict(merged_stacked, strict=True)
    d = tmp_path / "disk"
    shutil.copytree(MOE, d)
    save_file({k: v.contiguous() for k, v in merged_disk.items()}, d / "model.safetensors")
    m2 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    base_logits = model(ids).logits
    l1, l2 = m1(ids).logits, m2(ids).logits
    assert float((l1 - base_logits).detach().abs().max()) > 1e-3  # the adapter does something
    assert float((l1 - l2).detach().abs().max()) <= 1e-5
    ck.close()
    ck2.close()


def test_onnx_adapter_file_read_back_by_ort(tmp_path):
    import onnxruntime as ort

    params = ort.AdapterFormat.read_adapter(str(LLM / "onnx" / "llama_lora.onnx_adapter")).get_parameters()
    ad = load_adapter(LLM / "onnx" / "llama_lora.onnx_adapter")
    assert len(params) == 2 * len(ad.deltas)


# --- hostile GGUF -----------------------------------------------------------------------------------
def _gguf_bytes() -> bytes:
    return (LLM / "gguf" / "llama_lora.gguf").read_bytes()


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:100], "corrupted GGUF"),
    (lambda b: b"GGUX" + b[4:], "not a GGUF"),
    (lambda b: b[:8] + struct.pack("<Q", 1 << 40) + b[16:], "corrupted GGUF"),
    (lambda b: b[:16] + struct.pack("<Q", 1 << 40) + b[24:], "corrupted GGUF"),
    (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "version"),
    (lambda b: b[:-64], "runs past the end"),
])
def test_gguf_hostile_input(tmp_path, mutate, msg):
    p = tmp_path / "bad.gguf"
    p.write_bytes(mutate(_gguf_bytes()))
    with pytest.raises(BadInputError, match=msg):
        load_adapter(p, format="gguf")


def test_gguf_model_file_is_not_an_adapter(tmp_path):
    import gguf

    p = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BadInputError, match="not a LoRA adapter"):
        load_adapter(p)


def test_gguf_wrong_architecture_for_base():
    from loraport.checkpoint import Checkpoint

    with pytest.raises(BadInputError, match="architecture"):
        load_adapter(LLM / "gguf" / "llama_lora.gguf", base=Checkpoint.open(MOE))


def test_torchtune_without_alpha_refused(tmp_path):
    d = tmp_path / "tt"
    d.mkdir()
    shutil.copy(LLM / "torchtune" / "llama_lora" / "adapter_model.pt", d)
    with pytest.raises(BadInputError, match="lora_alpha"):
        load_adapter(d)


def test_mlx_unexpected_leaf(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "m"
    d.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.lora_a": torch.zeros(32, 2),
               "model.layers.0.self_attn.q_proj.lora_b": torch.zeros(2, 32),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, d / "adapters.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"scale": 2}}))
    with pytest.raises(BadInputError, match="unexpected tensor"):
        load_adapter(d)


def test_name_table_agrees_with_gguf_py():
    """Our GGUF ↔ HF table against gguf-py's own TensorNameMap for the families we list."""
    import gguf

    from loraport.names.llm import GGUF_BLOCK, GGUF_GLOBAL, gguf_to_hf, hf_to_gguf

    archs = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE}
    checked = 0
    for g, h, fams in GGUF_BLOCK + GGUF_GLOBAL:
        for fam in fams.split():
            if fam not in archs:
                continue
            tmap = gguf.get_tensor_name_map(archs[fam], 2)
            hf = f"model.layers.1.{h}.weight" if (g, h, fams) in GGUF_BLOCK else f"{h}.weight"
            want = tmap.get_name(hf, try_suffixes=(".weight",))
            assert want == hf_to_gguf(hf), (fam, hf)
            assert gguf_to_hf(want, {hf}) == hf
            checked += 1
    assert checked > 20
    assert math.isfinite(checked)


def test_gguf_experts_onto_stacked_base(tmp_path):
    """GGUF `ffn_*_exps` LoRA (from the mlx switch fixture) onto transformers' stacked gate_up_proj / down_proj:
    same merged tensors as onto the per-expert on-disk base, re-stacked the way transformers loads them."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from loraport.checkpoint import Checkpoint
    from loraport.conversion import convert_adapter
    from loraport.merging import build_plan, merged_tensor

    g = tmp_path / "moe.gguf"
    convert_adapter(LLM / "mlx" / "qwen2moe_switch", "gguf", g, base=MOE)
    model = AutoModelForCausalLM.from_pretrained(MOE, dtype=torch.float32)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp_path / "s.safetensors")
    ck_s, ck_d = Checkpoint.open(tmp_path / "s.safetensors"), Checkpoint.open(MOE)
    ad_s, ad_d = load_adapter(g, base=ck_s), load_adapter(g, base=ck_d)
    assert {d.kind for d in ad_s.deltas} == {"lora", "lora-experts"}
    ps, pd = build_plan(ck_s, [(ad_s, 1.0)]), build_plan(ck_d, [(ad_d, 1.0)])
    gu = merged_tensor(ps, "model.layers.0.mlp.experts.gate_up_proj")
    dn = merged_tensor(ps, "model.layers.0.mlp.experts.down_proj")
    inter = gu.shape[1] // 2
    for e in range(gu.shape[0]):
        gate = merged_tensor(pd, f"model.layers.0.mlp.experts.{e}.gate_proj.weight")
        up = merged_tensor(pd, f"model.layers.0.mlp.experts.{e}.up_proj.weight")
        down = merged_tensor(pd, f"model.layers.0.mlp.experts.{e}.down_proj.weight")
        assert torch.allclose(gu[e, :inter], gate, atol=1e-6) and torch.allclose(gu[e, inter:], up, atol=1e-6)
        assert torch.allclose(dn[e], down, atol=1e-6)
    assert not torch.allclose(gu, ck_s.get("model.layers.0.mlp.experts.gate_up_proj").float())


def test_mlx_dora_embedding_per_row(tmp_path):
    """mlx-lm DoRAEmbedding.fuse: W'' = (m / ‖W + s·a@b‖_row)[:, None] ⊙ (W + s·a@b), m one per table row."""
    from safetensors.torch import save_file

    from loraport.checkpoint import Checkpoint
    from loraport.merging import build_plan, merged_tensor

    ck = Checkpoint.open(LLAMA)
    W = ck.get("model.embed_tokens.weight").float()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(W.shape[0], 2, generator=g), torch.randn(2, W.shape[1], generator=g)
    m = W.norm(dim=1) * (1 + 0.3 * torch.rand(W.shape[0], generator=g))
    d = tmp_path / "mlx"
    d.mkdir()
    save_file({"model.embed_tokens.lora_a": a, "model.embed_tokens.lora_b": b, "model.embed_tokens.m": m},
              d / "adapters.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "dora",
                                                       "lora_parameters": {"rank": 2, "scale": 0.5}}))
    ad = load_adapter(d, base=ck)
    got = merged_tensor(build_plan(ck, [(ad, 1.0)]), "model.embed_tokens.weight")
    adapted = W + 0.5 * a @ b
    want = (m / adapted.norm(dim=1))[:, None] * adapted
    assert float((got - want).abs().max()) <= 1e-5


def test_torchtune_native_safetensors(tmp_path):
    """torchtune with safe_serialization: native keys in adapter_model.safetensors (the PEFT reader declines)."""
    from safetensors.torch import save_file

    src = LLM / "torchtune" / "llama_lora"
    d = tmp_path / "tt"
    d.mkdir()
    save_file(torch.load(src / "adapter_model.pt", weights_only=True), d / "adapter_model.safetensors")
    shutil.copy(src / "adapter_config.json", d)
    assert detect(d).name == "torchtune"
    assert max_diff(loraport_deltas(d), peft_deltas(str(LLM / "peft" / "llama_lora"))) <= TOL
