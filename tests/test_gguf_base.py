"""GGUF bases (loraport/gguf_merge.py, engine/gguf_source.py, engine/gguf_sink.py, quant/ggml.py): a PEFT
LoRA merged into a llama.cpp-layout GGUF model written by gguf-py. Oracles: gguf.quants (codes, bit for bit),
gguf.GGUFReader (types, shapes, metadata), PEFT's merge_and_unload on the dequantized base."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch
from _gguf_base_util import LLAMA, gguf_name, llama_permute, make_llama_gguf
from _peft_util import cli

from loraport.quant import ggml

ADAPTER = LLAMA.parent.parent / "peft" / "llama_lora"
BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _hostile_blocks(rng) -> np.ndarray:
    """Random rows plus the blocks where rounding and tie-breaking decide codes."""
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[0, :32] = 0  # d = 0
    x[1, :32] = 1.0  # all equal: max = min
    x[2, :16], x[2, 16:32] = 2.0, -2.0  # |max| tie between signs: the first wins
    x[3, :32] = np.arange(32, dtype=np.float32) / 2 - 8  # exact halves
    x[4] *= np.float32(1e-30)  # subnormal-ish scales, d underflows in fp16
    x[5] *= np.float32(1e5)  # d overflows fp16
    x[6, :32] = np.float32(0.49999997)  # roundf's trap: floor(x + 0.5) would give 1
    x[7, :32] = -np.float32(1e-8)
    return x


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", *BLOCK_TYPES])
def test_codes_bit_exact_with_gguf_quants(name):
    x = _hostile_blocks(np.random.default_rng(3))
    qt = gguf.GGMLQuantizationType[name]
    t = ggml.TYPES[qt.value]
    with np.errstate(over="ignore"):
        ref = gguf.quants.quantize(x, qt)
    ours = ggml.quantize(torch.from_numpy(x), t).numpy()
    assert np.array_equal(ref.reshape(-1).view(np.uint8), ours)
    with np.errstate(over="ignore", invalid="ignore"):
        back_ref = gguf.quants.dequantize(ref, qt).astype(np.float32)
    back = ggml.dequantize(torch.from_numpy(ours.copy()), t, x.shape).numpy()
    assert np.array_equal(back_ref, back, equal_nan=True)


def _reader_meta(r: gguf.GGUFReader) -> dict:
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _peft_reference(base_gguf, model=LLAMA, adapter=ADAPTER) -> dict[str, torch.Tensor]:
    """PEFT's merge of the adapter into the model whose weights are the GGUF's, dequantized by gguf.quants and
    un-permuted: HF name -> merged fp32."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    r = gguf.GGUFReader(base_gguf)
    by_gguf = {t.name: t for t in r.tensors}
    cfg = AutoConfig.from_pretrained(model)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = {}
    for hf in m.state_dict():
        t = by_gguf[gguf_name(hf)]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape)))
        if hf.endswith(("q_proj.weight", "k_proj.weight")):  # invert llama.cpp's permutation
            nh = cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads
            w = w.reshape(nh, w.shape[0] // nh // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        sd[hf] = torch.from_numpy(np.ascontiguousarray(w))
    m.load_state_dict(sd)
    merged = PeftModel.from_pretrained(m, str(adapter)).merge_and_unload().state_dict()
    return {k: merged[k].float() for k in sd}, sd, cfg


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0", "BF16"])  # the rest: test_codes_equal_gguf_quants...
def test_merge_keeps_types_metadata_and_matches_peft(tmp_path, qtype):
    base = make_llama_gguf(tmp_path / "base.gguf", qtype)
    before = base.read_bytes()
    out = tmp_path / "merged.gguf"
    res = cli("merge", "--base", base, "--adapter", ADAPTER, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    assert base.read_bytes() == before
    rb, ro = gguf.GGUFReader(base), gguf.GGUFReader(out)
    # every tensor: same name, order, type, shape; metadata equal, plus loraport's provenance keys
    assert [(t.name, t.tensor_type, list(t.shape)) for t in rb.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in ro.tensors]
    mb, mo = _reader_meta(rb), _reader_meta(ro)
    assert {k: v for k, v in mo.items() if not k.startswith("loraport.")} == mb
    assert "loraport.version" in mo
    ref, base_sd, cfg = _peft_reference(base)
    out_t = {t.name: t for t in ro.tensors}
    updated = 0
    for t in rb.tensors:
        o = out_t[t.name]
        hf = next(k for k in ref if gguf_name(k) == t.name)
        if torch.equal(ref[hf], base_sd[hf]):  # untouched: byte for byte
            assert np.array_equal(o.data, t.data), t.name
            continue
        updated += 1
        w = ref[hf].numpy()
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            w = llama_permute(w, cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads)
        want = gguf.quants.quantize(np.ascontiguousarray(w), t.tensor_type)
        # codes: gguf.quants of PEFT's merged weights; PEFT and loraport sum B·A·s in a different order, so
        # a code may flip where the merged value sits within fp32 rounding of a rounding boundary
        same = np.mean(want.reshape(-1).view(np.uint8) == o.data.reshape(-1).view(np.uint8))
        assert same > 0.995, (t.name, same)
        got = gguf.quants.dequantize(o.data, t.tensor_type).reshape(w.shape)
        step = np.abs(gguf.quants.dequantize(want, t.tensor_type).reshape(w.shape) - w).max()
        assert np.abs(got - w).max() <= step * 1.01 + 1e-6, t.name
    assert updated == 14


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "F16"])
def test_codes_equal_gguf_quants_of_loraport_merge(tmp_path, qtype):
    """The re-quantized bytes are exactly gguf.quants.quantize of the merged fp32 weights the engine computes."""
    from loraport.engine.apply import merged_tensor
    from loraport.engine.gguf_source import GgufBase
    from loraport.merging import _load_adapters, _plan
    from loraport.manifest import HashCache

    base = make_llama_gguf(tmp_path / "base.gguf", qtype)
    out = tmp_path / "merged.gguf"
    assert cli("merge", "--base", base, "--adapter", ADAPTER, "--out", out).exit_code == 0
    src = GgufBase.open(base)
    loaded, _ = _load_adapters([(ADAPTER, 1.0)], src, None, True, "warn", HashCache.of(False))
    plan = _plan(src, loaded, True)
    ro = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name in plan.updates:
        g = src.gguf_of[name]
        W = merged_tensor(plan, name).numpy()
        if src._heads(name):
            W = llama_permute(W, src._heads(name))
        want = gguf.quants.quantize(np.ascontiguousarray(W), ro[g].tensor_type)
        assert np.array_equal(want.reshape(-1).view(np.uint8), ro[g].data.reshape(-1).view(np.uint8)), name
    src.close()


def test_gguf_adapter_equals_peft_adapter_on_a_gguf_base(tmp_path):
    """llama.cpp's own adapter (lora_b rows in its RoPE order) and PEFT's (HF order) give the same bytes: the
    base's q/k rows are un-permuted on reading and permuted back on writing, consistently with the reader."""
    base = make_llama_gguf(tmp_path / "base.gguf", "Q4_1")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert cli("merge", "--base", base, "--adapter", LLAMA.parent.parent / "gguf" / "llama_lora.gguf",
               "--out", a).exit_code == 0
    assert cli("merge", "--base", base, "--adapter", ADAPTER, "--out", b).exit_code == 0
    ta, tb = gguf.GGUFReader(a).tensors, gguf.GGUFReader(b).tensors
    assert [t.name for t in ta] == [t.name for t in tb]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(ta, tb))
    assert not all(np.array_equal(x.data, y.data) for x, y in zip(ta, gguf.GGUFReader(base).tensors))


def test_report_has_delta_survival(tmp_path):
    base = make_llama_gguf(tmp_path / "base.gguf", "Q8_0")
    res = cli("merge", "--base", base, "--adapter", ADAPTER, "--out", tmp_path / "m.gguf", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    rows = rep.get("quantization") or rep["report"]["quantization"]
    total = rows[-1]
    assert total["name"] == "(total)" and total["updated_tensors"] == 14 and total["erased_tensors"] == 0
    assert all(r["type"] in ("Q8_0", "F16") for r in rows[:-1])
    assert all(0.9 < r["delta_retained"] < 1.1 for r in rows if r.get("type") == "Q8_0")


def _set_type(path, tensor: str, new_type: int) -> None:
    """Rewrite one tensor-info record's ggml type in place (the file is the test's own copy)."""
    b = bytearray(path.read_bytes())
    i = b.find(tensor.encode()) + len(tensor)
    (nd,) = struct.unpack_from("<I", b, i)
    struct.pack_into("<I", b, i + 4 + 8 * nd, new_type)
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("case", ["q8_k", "unknown", "truncated", "ragged"])
def test_bad_gguf_base_is_one_line_exit_2(tmp_path, case):
    base = make_llama_gguf(tmp_path / "base.gguf", "Q8_0")
    if case == "q8_k":  # llama.cpp's dot-product intermediate, never a stored weight: refused by name
        _set_type(base, "blk.0.attn_q.weight", 15)
    elif case == "unknown":
        _set_type(base, "blk.0.attn_q.weight", 777)
    elif case == "truncated":
        base.write_bytes(base.read_bytes()[:-100])
    else:  # a Q8_0 tensor whose rows are not whole blocks (48 = 1.5 blocks)
        _set_type(base, "blk.0.ffn_down.weight", 8)
    out = tmp_path / "m.gguf"
    res = cli("merge", "--base", base, "--adapter", ADAPTER, "--out", out)
    assert res.exit_code == 2, res.output
    msg = res.stderr.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in res.output and str(base) in msg
    want = {"q8_k": "Q8_K", "unknown": "777", "truncated": "past the end", "ragged": "block size"}[case]
    assert want in msg
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_refuses_options_it_cannot_honour(tmp_path):
    base = make_llama_gguf(tmp_path / "base.gguf", "Q8_0")
    res = cli("merge", "--base", base, "--adapter", ADAPTER, "--out", tmp_path / "m.gguf", "--dtype", "fp16")
    assert res.exit_code == 2 and "--dtype" in res.stderr
    res = cli("merge", "--base", base, "--adapter", ADAPTER, "--out", tmp_path / "m.safetensors")
    assert res.exit_code == 2 and ".gguf" in res.stderr


def _wide_llama(tmp_path):
    """A llama whose rows are whole k-quant super-blocks (256), and a PEFT LoRA for it made by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "hf")
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                                            init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    return tmp_path / "hf", tmp_path / "lora"


@pytest.mark.parametrize("qtype,written", [("Q4_K", "Q4_K"), ("Q6_K", "Q6_K"), ("IQ4_XS", "Q4_K")])
def test_k_quant_base_read_exactly_written_in_own_or_fallback_type(tmp_path, qtype, written):
    """k-quants and IQ types are read with gguf.quants' dequantizer; updated k-quant tensors keep their type
    (codes: loraport.quant.ggml_kquants, equal to libggml's in tests/test_ggml_kquants.py), an IQ type has no
    quantizer and goes to its fallback with a warning; untouched tensors keep their bytes."""
    hf, lora = _wide_llama(tmp_path)
    base = make_llama_gguf(tmp_path / "base.gguf", qtype, model=hf)
    out = tmp_path / "merged.gguf"
    res = cli("merge", "--base", base, "--adapter", lora, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    assert (f"written as {written}" in res.output) == (written != qtype)
    ref, base_sd, cfg = _peft_reference(base, hf, lora)
    rb, ro = {t.name: t for t in gguf.GGUFReader(base).tensors}, {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert list(rb) == list(ro)
    for hf_name, w in ref.items():
        g = gguf_name(hf_name)
        if torch.equal(w, base_sd[hf_name]):
            assert ro[g].tensor_type == rb[g].tensor_type and np.array_equal(ro[g].data, rb[g].data), g
            continue
        assert ro[g].tensor_type.name == written, g
        w = w.numpy()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            w = llama_permute(w, cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads)
        want = ggml.quantize(torch.from_numpy(np.ascontiguousarray(w)), ggml.BY_NAME[written]).numpy()
        same = np.mean(want.reshape(-1).view(np.uint8) == ro[g].data.reshape(-1).view(np.uint8))
        assert same > 0.995, (g, same)


def test_inspect_adapter_against_gguf_base_is_the_merge(tmp_path):
    """`inspect ADAPTER --base model.gguf` says what the merge then does: the same tensors re-quantized, per type."""
    base = make_llama_gguf(tmp_path / "base.gguf", "Q4_1")
    res = cli("inspect", ADAPTER, "--base", base, "--json")
    assert res.exit_code == 0, res.output
    b = json.loads(res.stdout)["base"]
    assert b["architecture"] == "llama" and b["storage"] == {"Q4_1": 14, "F32": 5, "F16": 2}
    assert b["families"]["model.layers.*.mlp.down_proj.weight"] == {"types": {"F16": 2}, "count": 2, "bytes": 6144}
    out = tmp_path / "m.gguf"
    assert cli("merge", "--base", base, "--adapter", ADAPTER, "--out", out).exit_code == 0
    changed: dict[str, int] = {}
    for x, y in zip(gguf.GGUFReader(base).tensors, gguf.GGUFReader(out).tensors):
        if not np.array_equal(x.data, y.data):
            changed[y.tensor_type.name] = changed.get(y.tensor_type.name, 0) + 1
    assert b["merge"]["written"] == changed and b["merge"]["updated"] == sum(changed.values()) == 14
    assert b["merge"]["copied"] == 7


@pytest.mark.parametrize("workers", [1, 2])
def test_q8_0_over_many_chunks_and_nonfinite_blocks_equals_gguf_quants(workers):
    """Q8_0 writes each chunk of blocks into its slice of the output (quant/ggml.py _q8_0): 2.5 chunks' worth, on
    one thread and two, with NaN, ±inf, subnormal and signed-zero blocks among the hostile ones; codes equal
    gguf.quants'."""
    rng = np.random.default_rng(7)
    x = np.concatenate([_hostile_blocks(rng)] + [rng.standard_normal((64, 256)).astype(np.float32)] * 9)
    x = np.concatenate([x, rng.standard_normal((ggml.CHUNK * 32 * 2 // 256 - 64 * 10 + 40, 256))]).astype(np.float32)
    x[9, 5], x[10, 40], x[11, 70] = np.nan, np.inf, -np.inf
    x[12, :32], x[12, 32:64], x[13, :32] = np.float32(1e-40), np.float32(-1e-44), -0.0
    assert x.size // 32 > 2 * ggml.CHUNK
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(-1).view(np.uint8)
    ours = ggml.quantize(torch.from_numpy(x), ggml.BY_NAME["Q8_0"], workers=workers).numpy()
    assert np.array_equal(ref, ours)
