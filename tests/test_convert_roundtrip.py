"""`loraport convert`: PEFT → each writable LLM format → PEFT round trips (real PEFT loads the result), writer
output equal to what the producers' own layout gives, exact baking of rsLoRA / rank+alpha patterns, refusals
that name what would be lost, and --lossy errors that match the measured ones."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from loraport.conversion import convert_adapter
from loraport.errors import BadInputError, OutputError
from tests._llm_util import LLAMA, LLM, loraport_deltas, max_diff, peft_deltas

TOL = 1e-6
PEFT = LLM / "peft"


def _ext(fmt: str) -> str:
    return ".gguf" if fmt == "gguf" else ""


CASES = [
    ("llama_lora", "mlx"), ("llama_lora", "gguf"), ("llama_lora", "torchtune"), ("llama_lora", "peft"),
    ("llama_rslora", "mlx"), ("llama_rslora", "gguf"), ("llama_rslora", "torchtune"), ("llama_rslora", "peft"),
    ("llama_dora", "mlx"), ("llama_dora", "torchtune"), ("llama_dora", "peft"),
    ("llama_embed", "gguf"), ("llama_embed", "peft"),
]


@pytest.mark.parametrize("name,fmt", CASES)
def test_roundtrip_through_format(tmp_path, name, fmt):
    mid = tmp_path / f"mid{_ext(fmt)}"
    rep = convert_adapter(PEFT / name, fmt, mid, base=LLAMA)
    assert rep["max_abs_diff"] is not None and rep["max_abs_diff"] <= TOL
    back = tmp_path / "back"
    convert_adapter(mid, "peft", back, base=LLAMA)
    ref = peft_deltas(str(PEFT / name))
    assert max_diff(loraport_deltas(back), ref) <= TOL
    # and PEFT itself loads the round-tripped adapter to the same merge
    assert max_diff(peft_deltas(str(back)), ref) <= TOL


def test_rslora_patterns_baked_into_single_alpha(tmp_path):
    """rsLoRA with rank/alpha patterns into GGUF (one alpha per file): baked into B, ΔW unchanged."""
    import gguf

    out = tmp_path / "a.gguf"
    rep = convert_adapter(PEFT / "llama_rslora", "gguf", out, base=LLAMA)
    assert any("baked" in n for n in rep["notes"])
    rd = gguf.GGUFReader(str(out))
    ranks = {t.name: int(t.data.shape[0]) for t in rd.tensors if t.name.endswith(".lora_a")}
    assert len(set(ranks.values())) > 1  # ranks kept per tensor (llama.cpp reads r per tensor)
    assert max_diff(loraport_deltas(out), peft_deltas(str(PEFT / "llama_rslora"))) <= TOL


@pytest.mark.parametrize("name,fixture", [("llama_lora", "llama_lora.gguf"), ("llama_embed", "llama_embed.gguf")])
def test_gguf_writer_equals_llamacpp_layout(tmp_path, name, fixture):
    """Our GGUF writer produces the tensors llama.cpp's converter layout gives (names, q/k permute,
    token_embd transpose, alpha), as gguf's own GGUFReader reads them."""
    import gguf

    out = tmp_path / "x.gguf"
    convert_adapter(PEFT / name, "gguf", out, base=LLAMA)
    ours, ref = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(LLM / "gguf" / fixture))

    def kv(r, k):
        f = r.get_field(k)
        return f.contents() if f is not None else None

    for k in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha"):
        assert kv(ours, k) == kv(ref, k), k
    t1 = {t.name: np.array(t.data) for t in ours.tensors}
    t2 = {t.name: np.array(t.data) for t in ref.tensors}
    assert set(t1) == set(t2)
    for n in t1:
        assert t1[n].shape == t2[n].shape, n
        np.testing.assert_allclose(t1[n], t2[n], rtol=0, atol=1e-7)


def test_torchtune_writer_equals_torchtune_layout(tmp_path):
    out = tmp_path / "tt"
    convert_adapter(PEFT / "llama_dora", "torchtune", out, base=LLAMA)
    ours = torch.load(out / "adapter_model.pt", weights_only=True)
    ref = torch.load(LLM / "torchtune" / "llama_dora" / "adapter_model.pt", weights_only=True)
    assert set(ours) == set(ref)
    for k in ours:
        assert torch.allclose(ours[k].float(), ref[k].float(), atol=1e-7), k
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 6


def test_mlx_writer_layout(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "m"
    convert_adapter(PEFT / "llama_dora", "mlx", out, base=LLAMA)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora" and cfg["lora_parameters"]["scale"] == pytest.approx(1.5)
    assert "self_attn.q_proj" in cfg["lora_parameters"]["keys"]
    with safe_open(out / "adapters.safetensors", "pt") as f:
        assert f.metadata() == {"format": "mlx"}
        assert list(f.get_slice("model.layers.0.self_attn.q_proj.lora_a").get_shape()) == [32, 4]
        assert list(f.get_slice("model.layers.0.self_attn.k_proj.lora_b").get_shape()) == [4, 16]
        assert list(f.get_slice("model.layers.0.self_attn.q_proj.m").get_shape()) == [32]
    # identical bytes to the mlx-lm-layout fixture made from the same PEFT adapter
    with safe_open(out / "adapters.safetensors", "pt") as a, \
            safe_open(LLM / "mlx" / "llama_dora" / "adapters.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


# --- refusals and lossy ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,fmt,words", [
    ("llama_dora", "gguf", ["DoRA", "--lossy"]),
    ("llama_embed", "mlx", ["embed_tokens", "outside"]),
    ("llama_embed", "torchtune", ["embedding"]),
])
def test_refused_with_reason_and_nothing_written(tmp_path, name, fmt, words):
    out = tmp_path / f"o{_ext(fmt)}"
    with pytest.raises(BadInputError) as e:
        convert_adapter(PEFT / name, fmt, out, base=LLAMA)
    for w in words:  # the flag to use is a hint the CLI shows where the command has it (LoraportError.hint)
        assert w in str(e.value) + str(e.value.flag_hint or "")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_lossy_dora_into_gguf_reports_the_measured_error(tmp_path):
    out = tmp_path / "d.gguf"
    rep = convert_adapter(PEFT / "llama_dora", "gguf", out, base=LLAMA, lossy=True, rank=4)
    assert rep["lossy"] and rep["refactored"]
    exact = peft_deltas(str(PEFT / "llama_dora"))  # PEFT's own DoRA merge
    got = loraport_deltas(out)
    for r in rep["refactored"]:
        t = r["target"]
        measured = float((got[t] - exact[t]).norm() / exact[t].norm())
        assert measured == pytest.approx(r["rel_error"], rel=1e-3, abs=1e-6)
    assert rep["max_rel_error"] > 1e-4  # DoRA's update is not rank 4: the loss is real and reported


def test_lossy_rank_is_the_best_rank_k(tmp_path):
    """--lossy --rank 2 on a rank-4 LoRA: per-module error equals the SVD tail of the exact ΔW
    (Eckart–Young, singular values from torch.linalg as the oracle)."""
    out = tmp_path / "m"
    rep = convert_adapter(PEFT / "llama_lora", "mlx", out, base=LLAMA, lossy=True, rank=2)
    exact = peft_deltas(str(PEFT / "llama_lora"))
    got = loraport_deltas(out)
    assert len(rep["refactored"]) == 14
    for t, D in exact.items():
        s = torch.linalg.svdvals(D.double())
        tail = float(s[2:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        measured = float((got[t].double() - D.double()).norm() / D.double().norm())
        assert measured == pytest.approx(tail, rel=1e-4, abs=1e-6)


def test_rank_without_lossy_refused(tmp_path):
    with pytest.raises(BadInputError, match="--lossy"):
        convert_adapter(PEFT / "llama_lora", "mlx", tmp_path / "m", base=LLAMA, rank=2)


def test_gguf_to_peft_needs_base(tmp_path):
    with pytest.raises(BadInputError, match="--base"):
        convert_adapter(LLM / "gguf" / "llama_lora.gguf", "peft", tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_existing_output_refused_then_overwritten(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        convert_adapter(PEFT / "llama_lora", "mlx", out, base=LLAMA)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(OutputError, match="did not write"):  # --overwrite replaces only loraport's outputs
        convert_adapter(PEFT / "llama_lora", "mlx", out, base=LLAMA, overwrite=True)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty folder, then the output loraport wrote there (its marker proves it)
        convert_adapter(PEFT / "llama_lora", "mlx", out, base=LLAMA, overwrite=True)
    assert (out / "adapters.safetensors").is_file() and (out / ".loraport-output").is_file()


# --- merge: each format into the HF base equals merging the PEFT original ---------------------------
@pytest.mark.parametrize("src,peft", [
    ("gguf/llama_lora.gguf", "llama_lora"), ("mlx/llama_dora", "llama_dora"),
    ("torchtune/llama_dora", "llama_dora"), ("onnx/llama_lora.onnx_adapter", "llama_lora"),
])
def test_merge_of_format_equals_merge_of_peft(tmp_path, src, peft):
    from safetensors.torch import load_file

    from loraport.merging import merge

    merge(LLAMA, [(LLM / src, 1.0)], tmp_path / "a", dtype="fp32")
    merge(LLAMA, [(PEFT / peft, 1.0)], tmp_path / "b", dtype="fp32")
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOL


# --- CLI -------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "loraport", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_convert_json_and_errors(tmp_path):
    r = _cli("convert", PEFT / "llama_rslora", "--to", "gguf", "--out", tmp_path / "a.gguf", "--base", LLAMA, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["source_format"] == "peft" and rep["max_abs_diff"] <= TOL
    r = _cli("convert", PEFT / "llama_rslora", "--to", "gguf", "--out", tmp_path / "a.gguf", "--base", LLAMA)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--overwrite" in r.stderr
    r = _cli("convert", PEFT / "llama_dora", "--to", "gguf", "--out", tmp_path / "b.gguf", "--base", LLAMA)
    assert r.returncode == 2 and "DoRA" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.gguf").exists()
    r = _cli("convert", PEFT / "llama_lora", "--to", "mlx", "--out", tmp_path / "c", "--quantize", "int8")
    assert r.returncode == 2 and "--quantize" in r.stderr


# --- MoE experts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
def test_moe_switch_roundtrip(tmp_path, fmt):
    """mlx-lm SwitchLinear LoRA → GGUF `ffn_*_exps` (3-D) / MLX again → same per-expert ΔW on the Qwen2-MoE base."""
    from tests._llm_util import MOE

    src = LLM / "mlx" / "qwen2moe_switch"
    out = tmp_path / f"x{_ext(fmt)}"
    rep = convert_adapter(src, fmt, out, base=MOE)
    assert rep["max_abs_diff"] == 0.0
    if fmt == "gguf":
        import gguf

        shapes = {t.name: tuple(reversed([int(x) for x in t.shape])) for t in gguf.GGUFReader(str(out)).tensors}
        assert shapes["blk.0.ffn_up_exps.weight.lora_a"] == (4, 2, 16)  # [E, r, in]
        assert shapes["blk.0.ffn_up_exps.weight.lora_b"] == (4, 8, 2)  # [E, out, r]
    assert max_diff(loraport_deltas(out, MOE), loraport_deltas(src, MOE)) <= TOL


# --- GGUF outtypes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_gguf_f16_and_q8_0_read_like_gguf_py(tmp_path, qtype):
    """convert_lora_to_gguf --outtype f16 / q8_0: loraport's reading equals gguf-py's own dequantization."""
    import gguf

    src = gguf.GGUFReader(str(LLM / "gguf" / "llama_lora.gguf"))
    out = tmp_path / f"{qtype}.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    want = {}
    n_q = 0
    for t in src.tensors:
        a = np.array(t.data, dtype=np.float32)
        if qtype == "F16" or not gguf.quants.Q8_0.can_quantize(a):  # the converter falls back to F16 too
            w.add_tensor(t.name, a.astype(np.float16))
            want[t.name] = a.astype(np.float16).astype(np.float32)
        else:
            n_q += 1
            q = gguf.quants.quantize(a, qt)
            w.add_tensor(t.name, q, raw_dtype=qt)
            want[t.name] = gguf.quants.dequantize(q, qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from loraport.formats import load_adapter

    ad = {d.target: d for d in load_adapter(out).deltas}
    for name, d in ad.items():
        A, B = torch.from_numpy(want[name + ".lora_a"]), torch.from_numpy(want[name + ".lora_b"])
        assert torch.equal(d.A.float(), A) and torch.equal(d.B.float(), B), name
    assert qtype == "F16" or n_q > 0


def test_rope_permutation_inverse_property():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from loraport.names.llm import rope_permute_rows, rope_unpermute_rows

    @settings(max_examples=40, deadline=None)
    @given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 4))
    def check(heads, half, cols):
        t = torch.randn(heads * 2 * half, cols)
        p = rope_permute_rows(t, heads)
        assert torch.equal(rope_unpermute_rows(p, heads), t)
        # per head, rows [h0 | h1] become interleaved pairs (h0[i], h1[i])
        hd = 2 * half
        assert torch.equal(p[1], t[half]) and torch.equal(p[hd - 2], t[half - 1])

    check()


@pytest.mark.slow
def test_gguf_to_onnx_adapter_reads_back_to_peft_delta(tmp_path):
    """GGUF → `.onnx_adapter` for a loraport multi-LoRA graph (loraport/onnx writer) → the .onnx_adapter
    reader: the same ΔW as PEFT's merge of the original adapter."""
    from loraport.conversion import onnx_convert

    graph = tmp_path / "g"
    onnx_convert(adapters=[str(PEFT / "llama_lora")], to="onnx", out=str(graph), base=str(LLAMA), multi_lora=True)
    out = tmp_path / "x.onnx_adapter"
    onnx_convert(adapters=[str(LLM / "gguf" / "llama_lora.gguf")], to="onnx-adapter", out=str(out), graph=str(graph),
                 base=str(LLAMA))
    assert max_diff(loraport_deltas(out), peft_deltas(str(PEFT / "llama_lora"))) <= TOL


def test_torchtune_refuses_a_delta_on_a_norm_instead_of_mangling_its_name(tmp_path):
    """torchtune spells norms `….scale`; the writer used to cut 7 characters off it (`sa_nor.lora_a.weight`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "a"
    shutil.copytree(PEFT / "llama_lora", src)
    t = {k: v for k, v in load_file(src / "adapter_model.safetensors").items() if ".mlp." in k}
    t["base_model.model.model.layers.0.input_layernorm.lora_A.weight"] = torch.randn(4, 32)
    t["base_model.model.model.layers.0.input_layernorm.lora_B.weight"] = torch.randn(32, 4)
    save_file(t, src / "adapter_model.safetensors")
    out = tmp_path / "tt"
    with pytest.raises(BadInputError, match="sa_norm.scale, not a linear weight"):
        convert_adapter(src, "torchtune", out)
    assert not out.exists()
