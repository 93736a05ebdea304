"""Hostile folders and files built by each test: remote code, regex bombs, container bombs, hostile configs,
degenerate ranks and malformed ONNX fields end in a one-line LoraportError (or the mathematically right
result), fast, on any thread — never in code execution, a hang or a traceback."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import _hostile_classes as HC
from _hostile_classes import RUN, diffusers_file, evil_folder, gguf_adapter_with_array, on_worker, peft_adapter
from loraport.errors import BadInputError, LoraportError, UnsafeInputError
from loraport.formats import load_adapter
from loraport.patterns import Deadline, PatternTable
from loraport.safetensors_io import MAX_ENTRIES, SafetensorsFile
from loraport.jsonfile import MAX_JSON

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "fixtures" / "llm" / "bases" / "llama"
LORA = ROOT / "fixtures" / "llm" / "peft" / "llama_lora"
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert isinstance(e, LoraportError) and msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "loraport", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


# ---- remote code ---------------------------------------------------------------------------------------
def test_remote_code_folder_is_live(tmp_path):
    """The hostile folder really runs its code when trusted (so the next test proves something)."""
    import transformers

    folder, marker = evil_folder(tmp_path)
    transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert marker.exists()


def test_validate_never_runs_folder_code_even_with_yes_on_stdin(tmp_path):
    """(loraport before this check: transformers prompted, read the piped "y" and ran modeling_evil.py)"""
    folder, marker = evil_folder(tmp_path)
    r = _cli("validate", str(folder), "--base", str(folder), "--adapter", str(LORA), stdin="y\n" * 20)
    assert not marker.exists(), "the folder's code ran"
    assert r.returncode == 2, r.stderr
    assert "auto_map" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_onnx_export_never_runs_folder_code(tmp_path, monkeypatch):
    from loraport.onnx.export import export_onnx

    folder, marker = evil_folder(tmp_path)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("y\n" * 20))
    with pytest.raises(UnsafeInputError) as e:
        export_onnx(folder, [(str(LORA), 1.0)], tmp_path / "out")
    assert "auto_map" in _one_line(e.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---- pattern bombs -------------------------------------------------------------------------------------
def test_patterns_match_peft_exactly():
    """Our guarded lookup picks the same key as PEFT's own get_pattern_key for legitimate patterns."""
    from peft.utils.other import get_pattern_key

    keys = ["model.layers.1.self_attn.q_proj", r"layers\.0\..*_proj", "^model\\.layers\\.1\\.mlp\\.up_proj",
            "q_proj", "v_proj", r"\bk_proj", "(gate|up)_proj", "layers.[0-9].mlp.down_proj", r"o_pro\w",
            re.escape("model.layers.0.self_attn.v_proj"), "self_attn.v_proj"]
    mods = [f"model.layers.{i}.{m}" for i in range(3) for m in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")] + ["lm_head", "xq_proj", "model.embed_tokens", "a.b\n"]
    for order in (keys, keys[::-1], keys[3:] + keys[:3]):
        table = PatternTable({k: i for i, k in enumerate(order)}, "rank_pattern", "test")
        for m in mods:
            want = get_pattern_key(order, m)
            hit = table.lookup(m)
            assert (hit[0] if hit else m) == want, (m, hit, want)


@pytest.mark.parametrize("key,why", [("(a+)+$", "repeats a group"), ("(a|aa)*b", "repeats a group"),
                                     (r"(\w)\1", "backreference"), ("(?=q)q_proj", "lookaround"),
                                     (".*.*.*.*x", "open-ended"), ("x" * 2000, "characters long"),
                                     ("(", "not a valid regex")])
def test_unsafe_pattern_keys_refused(key, why):
    with pytest.raises(BadInputError, match=why):
        PatternTable({key: 4}, "rank_pattern", "cfg.json")


def test_peft_pattern_bombs_on_a_worker_thread(tmp_path):
    redos = peft_adapter(tmp_path / "redos", 2, cfg_extra={"rank_pattern": {"(a+)+$": 2}}, leaf=RUN)
    err, dt = on_worker(lambda: load_adapter(redos, format="peft"))
    assert isinstance(err, BadInputError) and "rank_pattern" in _one_line(err) and dt < 3
    # 10k non-literal keys × 1000 modules: the shared budget stops it with one line
    many = {rf"layers\.{i}\d*\.mlp\.y_proj": 3 for i in range(10_000)}
    bomb = peft_adapter(tmp_path / "many", 1000, cfg_extra={"alpha_pattern": many})
    err, dt = on_worker(lambda: load_adapter(bomb, format="peft"))
    assert isinstance(err, BadInputError) and "took over" in _one_line(err), err
    assert dt < 10
    # the same count of escaped (literal) keys — what writers emit — is matched fast and right
    lit = {re.escape(f"model.layers.{i}.mlp.x_proj"): 1 + i % 5 for i in range(10_000)}
    ok = peft_adapter(tmp_path / "lit", 1000, cfg_extra={"alpha_pattern": lit})
    t0 = time.perf_counter()
    ad = load_adapter(ok, format="peft")
    assert time.perf_counter() - t0 < 5
    assert {d.target: d.alpha for d in ad.deltas}["model.layers.7.mlp.x_proj.weight"] == 1 + 7 % 5


def test_pattern_bomb_in_a_two_adapter_merge(tmp_path):
    from loraport.merging import merge

    bomb = HC.with_config(LORA, tmp_path / "bomb", alpha_pattern={"(q+)+_proj": 2})
    t0 = time.perf_counter()
    with pytest.raises(BadInputError) as e:
        merge(LLAMA, [(LORA, 1.0), (bomb, 1.0)], tmp_path / "out")
    assert "alpha_pattern" in _one_line(e.value) and time.perf_counter() - t0 < 20
    assert not (tmp_path / "out").exists()


def test_diffusers_metadata_pattern_bombs_on_a_worker_thread(tmp_path):
    f = diffusers_file(tmp_path / "redos.safetensors", 2,
                        {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {"(a+)+$": 3}}, leaf=RUN)
    err, dt = on_worker(lambda: load_adapter(f, format="diffusers"))
    assert isinstance(err, BadInputError) and "alpha_pattern" in _one_line(err) and dt < 3
    many = {rf"blocks\.{i}\d*\.attn\.to_k": 3 for i in range(10_000)}
    f2 = diffusers_file(tmp_path / "many.safetensors", 1000,
                         {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": many})
    err, dt = on_worker(lambda: load_adapter(f2, format="diffusers"))
    assert isinstance(err, BadInputError) and "took over" in _one_line(err) and dt < 10


def test_deadline_counts_only_pattern_work_and_is_shared():
    d = Deadline(0.5)
    first = PatternTable({r"a\d+": 1}, "rank_pattern", "x", d)
    second = PatternTable({r"b\d+": 2}, "alpha_pattern", "x", d)
    time.sleep(0.6)  # reading other things does not spend the budget
    assert first.lookup("m.a1") == (r"a\d+", 1) and second.lookup("m.b1") == (r"b\d+", 2)
    d.spent = 0.6  # as if the two tables had matched for 0.6 s between them
    with pytest.raises(BadInputError, match="took over"):
        second.lookup("model.c1")


# ---- container bombs ----------------------------------------------------------------------------------
def test_gguf_huge_metadata_array_bounded_memory(tmp_path):
    import tracemalloc

    from loraport.formats.gguf import GGUFFile

    n = 16 << 20
    big = gguf_adapter_with_array(tmp_path / "big.gguf", n)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        f = GGUFFile(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    arr = f.metadata["x.bomb"]
    f.close()
    assert isinstance(arr, np.ndarray) and arr.shape == (n,)
    assert peak < 2 * n  # a list of numpy scalars: ~40 bytes per byte
    huge = gguf_adapter_with_array(tmp_path / "huge.gguf", 1 << 30)
    t0 = time.perf_counter()
    with pytest.raises(BadInputError, match="metadata arrays"):
        load_adapter(huge, format="gguf")
    assert time.perf_counter() - t0 < 2


def test_safetensors_header_with_too_many_entries_refused_fast(tmp_path):
    p = HC.safetensors_many_entries(tmp_path / "many.safetensors", MAX_ENTRIES + 1)
    t0 = time.perf_counter()
    with pytest.raises(BadInputError, match="tensors"):
        SafetensorsFile(p)
    assert time.perf_counter() - t0 < 1.5


def test_oversized_json_refused(tmp_path):
    ad = tmp_path / "ad"
    shutil.copytree(LORA, ad)
    HC.pad_json(ad / "adapter_config.json", MAX_JSON + 11)  # valid JSON head, then padding past the cap
    with pytest.raises(BadInputError, match="bytes of JSON"):
        load_adapter(ad, format="peft")
    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    HC.pad_json(base / "config.json", MAX_JSON + 10, keep_head=False)
    with pytest.raises(BadInputError, match="bytes of JSON"):
        from loraport.checkpoint import Checkpoint

        Checkpoint.open(base)


@pytest.mark.parametrize("field,value,say", HC.HOSTILE_CONFIGS)
def test_hostile_config_refused_before_tracing(tmp_path, field, value, say):
    from loraport.onnx.export import export_onnx

    base = HC.with_config(LLAMA, tmp_path / "base", **{field: value})
    t0 = time.perf_counter()
    with pytest.raises(BadInputError) as e:
        export_onnx(base, [], tmp_path / "out")
    assert say in _one_line(e.value) and time.perf_counter() - t0 < 5  # refused before any tracing


def test_validate_refuses_hostile_config_before_transformers_builds(tmp_path):
    from loraport.parity import load_torch_model

    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["head_dim"] = 2**33  # a rotary buffer of 2**32 floats if transformers built it
    (base / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(BadInputError, match="head_dim"):
        load_torch_model(base)
    assert time.perf_counter() - t0 < 5


# ---- degenerate ranks ---------------------------------------------------------------------------------
def test_rank0_adapter_merges_to_the_base(tmp_path):
    from loraport.merging import merge

    ad = HC.rank0_adapter(tmp_path / "r0", LORA)
    merge(LLAMA, [(ad, 1.0)], tmp_path / "out")
    base = SafetensorsFile(LLAMA / "model.safetensors")
    out = SafetensorsFile(next((tmp_path / "out").glob("*.safetensors")))
    for n in base.names():
        assert torch.equal(base.get(n), out.get(n)), n
    base.close()
    out.close()


# ---- malformed ONNX fields ----------------------------------------------------------------------------
@pytest.mark.parametrize("mutate,say", HC.ONNX_FIELD_CASES)
def test_malformed_onnx_fields_give_one_line(tmp_path, mutate, say):
    from loraport.onnx.baking import bake

    p = HC.onnx_small_base(tmp_path, mutate)
    ad = HC.onnx_small_adapter(tmp_path / "ad")
    with pytest.raises(BadInputError) as e:
        bake(str(p), [(str(ad), 1.0)], str(tmp_path / "out.onnx"))
    assert say in _one_line(e.value)
    assert not (tmp_path / "out.onnx").exists()


# ---- found by bench/robustness_report.py --fuzz 10000 ---------------------------------------------------
def test_gguf_dimension_past_int64_with_a_zero_dimension(tmp_path):
    """A zero dimension makes the byte count 0 (so the size check passes); a second one of 2**63 then overflowed
    torch's reshape (a TypeError). Refused when the header is read."""
    import gguf

    src = ROOT / "fixtures" / "llm" / "gguf" / "llama_lora.gguf"
    data = bytearray(src.read_bytes())
    t = gguf.GGUFReader(src).tensors[0]
    dims = t.field.offset + t.field.parts[0].nbytes + t.field.parts[1].nbytes + t.field.parts[2].nbytes
    data[dims:dims + 16] = struct.pack("<QQ", 0, 2**63 + 5)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="dimension"):
        load_adapter(bad, format="gguf")


def test_torchtune_module_name_with_a_newline_stays_one_line(tmp_path):
    """A key naming a module across a newline, with its lora_b missing: the refusal quotes the name."""
    src = ROOT / "fixtures" / "llm" / "torchtune" / "llama_lora"
    ad = tmp_path / "ad"
    shutil.copytree(src, ad)
    sd = torch.load(src / "adapter_model.pt", weights_only=True)
    sd["layers.0\n.mlp.w2.lora_a.weight"] = sd.pop("layers.0.mlp.w2.lora_a.weight")
    sd.pop("layers.0.mlp.w2.lora_b.weight")
    torch.save(sd, ad / "adapter_model.pt")
    with pytest.raises(BadInputError) as e:
        load_adapter(ad, format="torchtune")
    assert "lora_a / lora_b" in _one_line(e.value)
