"""The core CLI contract (issue 2): bad input gives one line, exit 2, no traceback and nothing left behind;
`--json` summaries; `inspect` (text and JSON) reports what the adapter files say; `demo` runs offline.

Expected values are computed here from the fixture files themselves (shapes, config), never hard-coded.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from _peft_util import cli, fx, load_state, read_json, run_subprocess

BASE = fx("bases", "llama")
PLAIN = fx("adapters", "llama_plain")


# --- helpers ---------------------------------------------------------------------------------------
def listing(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_adapter(ad: Path, edit) -> None:
    """Load the adapter's tensors, let `edit(dict)` change them, save them back (with the reference lib)."""
    from safetensors.torch import save_file

    f = ad / "adapter_model.safetensors"
    sd = load_state(f)
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def assert_bad(res, parent: Path, before: list[str], *needles: str, code: int = 2) -> str:
    """One line on stderr, the exit code, no traceback, no exception escaping, nothing new under `parent`.
    Every broken promise is listed in one failure message."""
    msg = res.stderr.strip()
    problems = []
    if res.exit_code != code:
        problems.append(f"exit {res.exit_code} (want {code})")
    if not (res.exception is None or isinstance(res.exception, SystemExit)):
        problems.append(f"exception escaped the CLI: {res.exception!r}")
    if "Traceback" in res.output:
        problems.append("traceback printed")
    if not msg:
        problems.append("no error message")
    elif len(msg.splitlines()) != 1:
        problems.append(f"error is not one line ({len(msg.splitlines())} lines)")
    problems += [f"error does not mention {n!r}" for n in needles if n.lower() not in msg.lower()]
    left = sorted(set(listing(parent)) ^ set(before))
    if left:
        problems.append(f"left behind / removed: {left}")
    assert not problems, "; ".join(problems) + f"\nstderr: {msg!r}"
    return msg


def merge_bad(tmp_path: Path, *extra: str, adapter: Path = PLAIN, base: Path = BASE, needles=(), code=2) -> str:
    out = tmp_path / "out"
    before = listing(tmp_path)
    res = cli("merge", "--base", base, "--adapter", adapter, "--out", out, *extra)
    return assert_bad(res, tmp_path, before, *needles, code=code)


# --- bad input -------------------------------------------------------------------------------------
def test_adapter_missing_weights(tmp_path):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")
    (ad / "adapter_model.safetensors").unlink()
    merge_bad(tmp_path, adapter=ad, needles=[ad.name])


def test_adapter_missing_config(tmp_path):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")
    (ad / "adapter_config.json").unlink()
    merge_bad(tmp_path, adapter=ad, needles=[ad.name])


def test_adapter_empty_folder(tmp_path):
    (tmp_path / "my_adapter").mkdir()
    merge_bad(tmp_path, adapter=tmp_path / "my_adapter", needles=["my_adapter"])


def test_adapter_path_missing(tmp_path):
    merge_bad(tmp_path, adapter=tmp_path / "nope", needles=["nope"])


def test_base_path_missing(tmp_path):
    merge_bad(tmp_path, base=tmp_path / "nobase", needles=["nobase"])


def test_adapter_config_not_json(tmp_path):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")
    (ad / "adapter_config.json").write_text("{not json")
    merge_bad(tmp_path, adapter=ad, needles=["adapter_config.json"])


@pytest.mark.parametrize("how", ["truncated", "header_length", "header_json"])
def test_adapter_corrupt_safetensors(tmp_path, how):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")
    f = ad / "adapter_model.safetensors"
    data = f.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header_length":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    else:
        n = struct.unpack("<Q", data[:8])[0]
        data = data[:8] + b"{" * n + data[8 + n:]
    f.write_bytes(data)
    merge_bad(tmp_path, adapter=ad, needles=["adapter_model.safetensors"])


def test_base_truncated_shard(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(fx("bases", "llama_sharded"), base)
    shard = base / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    merge_bad(tmp_path, base=base, needles=["model-00002-of-00003.safetensors"])


def test_shape_mismatch(tmp_path):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

    def edit(sd):
        sd[key] = torch.randn(40, sd[key].shape[1])

    rewrite_adapter(ad, edit)
    merge_bad(tmp_path, adapter=ad, needles=["layers.1.self_attn.q_proj"])


def test_unmatched_targets_listed(tmp_path):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")

    def edit(sd):
        for k in [k for k in sd if ".layers.1.mlp.up_proj." in k]:
            sd[k.replace(".layers.1.", ".layers.7.")] = sd.pop(k)

    rewrite_adapter(ad, edit)
    merge_bad(tmp_path, adapter=ad, needles=["layers.7.mlp.up_proj"])


def test_adapter_for_another_architecture(tmp_path):
    merge_bad(tmp_path, adapter=fx("adapters", "gpt2_conv1d"), needles=["c_attn"])


@pytest.mark.parametrize("kind", ["prompt_tuning"])  # IA³ merges since #18 (tests/test_peft_methods.py)
def test_non_lora_peft_method_refused(tmp_path, kind):
    ad = fx("bad", kind)
    peft_type = read_json(ad / "adapter_config.json")["peft_type"]
    merge_bad(tmp_path, adapter=ad, needles=[peft_type])
    before = listing(tmp_path)
    assert_bad(cli("inspect", ad), tmp_path, before, peft_type)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_unsafe_pickle_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    ad = tmp_path / "my_adapter"
    ad.mkdir()
    shutil.copy(PLAIN / "adapter_config.json", ad / "adapter_config.json")
    payload = {"base_model.model.x.lora_A.weight": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, ad / "adapter_model.bin")
    else:
        with open(ad / "adapter_model.bin", "wb") as f:
            pickle.dump(payload, f)
    merge_bad(tmp_path, adapter=ad, needles=["adapter_model.bin"])
    assert not marker.exists(), "the pickle was executed"


def test_out_equals_base(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    snapshot = {p: p.read_bytes() for p in base.iterdir()}
    before = listing(tmp_path)
    res = cli("merge", "--base", base, "--adapter", PLAIN, "--out", base, "--overwrite")
    assert_bad(res, tmp_path, before)
    assert {p: p.read_bytes() for p in base.iterdir()} == snapshot


def test_out_inside_base(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    before = listing(tmp_path)
    res = cli("merge", "--base", base, "--adapter", PLAIN, "--out", base / "merged")
    assert_bad(res, tmp_path, before)


def test_out_inside_adapter(tmp_path):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")
    before = listing(tmp_path)
    res = cli("merge", "--base", BASE, "--adapter", ad, "--out", ad / "merged")
    assert_bad(res, tmp_path, before)


def test_existing_out_refused_then_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    res = cli("merge", "--base", BASE, "--adapter", PLAIN, "--out", out)
    assert_bad(res, tmp_path, before, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what loraport wrote: the user's folder stays, then (emptied) it is replaced,
    # and so is the output loraport wrote there
    res = cli("merge", "--base", BASE, "--adapter", PLAIN, "--out", out, "--overwrite")
    assert_bad(res, tmp_path, before, "did not write")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):
        res = cli("merge", "--base", BASE, "--adapter", PLAIN, "--out", out, "--overwrite")
        assert res.exit_code == 0, res.stderr
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temp siblings left behind"


def test_too_many_weights(tmp_path):
    merge_bad(tmp_path, "--weight", "1", "--weight", "2", needles=["weight"])


def test_bad_shard_size(tmp_path):
    merge_bad(tmp_path, "--shard-size", "lots", needles=["lots"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(tmp_path):
    out = tmp_path / "out"
    before = listing(tmp_path)
    res = cli("merge", "--base", BASE, "--adapter", PLAIN, "--out", out, "--device", "cuda")
    msg = res.stderr.strip()
    assert res.exit_code in (1, 2) and "Traceback" not in res.output and len(msg.splitlines()) == 1, msg
    assert "cuda" in msg.lower()
    assert listing(tmp_path) == before


def test_subprocess_bad_input_exit_code_no_traceback(tmp_path):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")
    f = ad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    before = listing(tmp_path)
    p = run_subprocess("merge", "--base", BASE, "--adapter", ad, "--out", tmp_path / "out")
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert listing(tmp_path) == before


# --- --json ------------------------------------------------------------------------------------------
def _num(k):
    try:
        return int(k)
    except ValueError:
        try:
            return float(k)
        except ValueError:
            return k


def _walk(obj, path=""):
    """(path, leaf) pairs; dict keys are leaves too (summaries may count values by key: {"4": 7})."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}.{k}#key", _num(k) if isinstance(k, str) else k
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def has_number(js, x: float, rel: float = 1e-3, abs_tol: float = 0.0) -> bool:
    return any(isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isclose(v, x, rel_tol=rel, abs_tol=abs_tol) for _, v in _walk(js))


def has_text(js, *subs: str) -> bool:
    return any(isinstance(v, str) and any(s.lower() in v.lower() for s in subs) for _, v in _walk(js))


def test_subprocess_merge_json(tmp_path):
    out = tmp_path / "out"
    p = run_subprocess("merge", "--base", BASE, "--adapter", PLAIN, "--adapter", fx("adapters", "llama_plain2"),
                       "--weight", "0.25", "--weight", "2", "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    rep = json.loads(p.stdout)
    assert has_text(rep, str(out)), "summary does not name the output"
    assert has_text(rep, str(PLAIN)) and has_text(rep, "llama_plain2"), "summary does not name the adapters"
    assert has_number(rep, 0.25) and has_number(rep, 2.0), "summary does not carry the weights"
    updated = {k.split(".lora_")[0].removeprefix("base_model.model.") + ".weight"
               for a in (PLAIN, fx("adapters", "llama_plain2")) for k in load_state(a / "adapter_model.safetensors")}
    assert rep["tensors_updated"] == len(updated), f"tensors_updated {rep['tensors_updated']}, want {len(updated)}"
    assert rep["device"].startswith("cuda" if torch.cuda.is_available() else "cpu"), "--device auto picked " + \
        rep["device"]


# --- inspect ---------------------------------------------------------------------------------------
def peft_trainable(ad: Path) -> int:
    """PEFT's own count (LoRA factors, DoRA magnitudes, modules_to_save copies; not the frozen
    `<module>.base_layer.weight` copies it saves next to embedding LoRA)."""
    pytest.importorskip("peft")
    from peft import PeftModel

    from _peft_util import load_base_model

    base = {"llama": fx("bases", "llama"), "gpt2": fx("bases", "gpt2"), "qwen2": fx("bases", "qwen2_bf16"),
            "conv": fx("bases", "conv", "model.safetensors")}[ad.name.split("_")[0]]
    pm = PeftModel.from_pretrained(load_base_model(base), str(ad), is_trainable=True)
    return pm.get_nb_trainable_parameters()[0]


def adapter_facts(ad: Path) -> dict:
    """What inspect must report, derived from the files (PEFT's own rules for alpha/rank patterns)."""
    cfg = read_json(ad / "adapter_config.json")
    sd = load_state(ad / "adapter_model.safetensors")
    a_keys = [k for k in sd if k.endswith("lora_A.weight") or k.endswith("lora_embedding_A")]
    ranks, full, lora_params = set(), 0, 0
    for k in a_keys:
        A = sd[k]
        B = sd[k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        ranks.add(A.shape[0])
        lora_params += A.numel() + B.numel()
        if "embedding" in k:  # A [r, vocab], B [dim, r]
            full += A.shape[1] * B.shape[0]
        else:  # A [r, in, *k], B [out, r, 1, 1]
            full += B.shape[0] * math.prod(A.shape[1:])
    trainable = peft_trainable(ad)
    alphas = {cfg["lora_alpha"], *(cfg.get("alpha_pattern") or {}).values()}
    modules = {k.split(".lora_")[0] for k in a_keys} | {
        k.removesuffix(".weight").removesuffix(".bias") for k in sd if "lora_" not in k and ".base_layer." not in k}
    mods = {m.rsplit(".", 1)[-1] for m in modules}
    return dict(cfg=cfg, targets=len(modules), ranks=ranks, alphas=alphas, trainable=trainable,
                ratios=[full / lora_params, full / trainable], mods=mods, dora=bool(cfg.get("use_dora")),
                rslora=bool(cfg.get("use_rslora")), size=(ad / "adapter_model.safetensors").stat().st_size,
                size_all=sum(p.stat().st_size for p in ad.iterdir() if p.is_file()))


INSPECT = ["llama_plain", "llama_rslora_patterns", "llama_dora", "llama_mts", "gpt2_conv1d", "conv_lora"]


@pytest.mark.parametrize("name", INSPECT)
def test_inspect_json(name):
    ad = fx("adapters", name)
    f = adapter_facts(ad)
    res = cli("inspect", ad, "--json")
    assert res.exit_code == 0, res.stderr
    js = json.loads(res.stdout)
    assert js["format"] == "peft"
    assert js["targets"] == f["targets"], f"targets {js['targets']}, the files hold {f['targets']} modules"
    assert {int(r) for r in js["ranks"]} == f["ranks"]
    assert {float(a) for a in js["alphas"]} == {float(a) for a in f["alphas"]}
    assert js["trainable_params"] == f["trainable"], f"trainable {js['trainable_params']}, want {f['trainable']}"
    assert any(math.isclose(js["compression"], r, rel_tol=0.01, abs_tol=0.05) for r in f["ratios"]), \
        f"full-rank cost ratio {js['compression']}, want {f['ratios'][0]:.3f}"
    assert js["file_bytes"] in (f["size"], f["size_all"]), js["file_bytes"]
    assert set(js["dtypes"]) == {"float32"}
    assert set(js["target_modules"]) == f["mods"]
    assert js["dora"] is f["dora"]
    rules = set(js["scale_rules"])
    assert rules, "scale rule not reported"
    assert all(("√" in r or "sqrt" in r.lower()) == f["rslora"] for r in rules), rules


@pytest.mark.parametrize("name", ["llama_plain", "llama_rslora_patterns", "llama_dora"])
def test_inspect_text(name):
    ad = fx("adapters", name)
    f = adapter_facts(ad)
    res = cli("inspect", ad)
    assert res.exit_code == 0, res.stderr
    text = res.stdout + res.stderr
    flat = text.replace(",", "").replace("_", "").replace("\u202f", "").replace(" ", "")
    assert "peft" in text.lower()
    for r in f["ranks"]:
        assert str(r) in text
    assert str(f["trainable"]) in flat, f"trainable params {f['trainable']} not shown"
    assert ("√" in text or "sqrt" in text.lower()) == f["rslora"], "scale rule not shown as rsLoRA/plain"
    assert "dora" in text.lower()
    for m in f["mods"]:
        assert m in text


def test_inspect_bad_input(tmp_path):
    ad = copy_adapter(PLAIN, tmp_path / "my_adapter")
    f = ad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    before = listing(tmp_path)
    assert_bad(cli("inspect", ad), tmp_path, before, "adapter_model.safetensors")
    assert_bad(cli("inspect", tmp_path / "missing"), tmp_path, before, "missing")


# --- demo ------------------------------------------------------------------------------------------
def test_demo_offline_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    env_cwd = tmp_path / "cwd"
    env_cwd.mkdir()
    p = _run_demo(env_cwd)
    dt = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert dt < 60, f"demo took {dt:.1f}s"
    assert list(env_cwd.iterdir()) == [], "demo left files in the working directory"
    assert "parity" in (p.stdout + p.stderr).lower(), "demo printed no parity report"


def _run_demo(cwd: Path):
    import subprocess

    from _peft_util import ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LORAPORT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "loraport", "demo"], capture_output=True, text=True,
                          timeout=120, cwd=str(cwd), env=env)


# --- single-file bases, failures mid-stream, flags -------------------------------------------------
CONV_BASE = fx("bases", "conv", "model.safetensors")
CONV_AD = fx("adapters", "conv_lora")


def test_single_file_out_equals_base(tmp_path):
    base = tmp_path / "model.safetensors"
    shutil.copy(CONV_BASE, base)
    data = base.read_bytes()
    before = listing(tmp_path)
    assert_bad(cli("merge", "--base", base, "--adapter", CONV_AD, "--out", base, "--overwrite"), tmp_path, before)
    assert base.read_bytes() == data


def test_single_file_existing_out_refused(tmp_path):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"mine")
    before = listing(tmp_path)
    assert_bad(cli("merge", "--base", CONV_BASE, "--adapter", CONV_AD, "--out", out), tmp_path, before,
               "--overwrite")
    assert out.read_bytes() == b"mine"


@pytest.fixture
def failing_engine(monkeypatch):
    """Make the engine fail on its third merged tensor (a stand-in for a disk or device failure mid-way)."""
    import importlib

    engine = importlib.import_module("loraport.engine.stream")  # where the stream looks the math up
    real, calls = engine.merged_tensor, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(engine, "merged_tensor", flaky)
    return calls


def test_failure_mid_stream_leaves_nothing(tmp_path, failing_engine):
    before = listing(tmp_path)
    res = cli("merge", "--base", fx("bases", "llama_sharded"), "--adapter", PLAIN, "--out", tmp_path / "out")
    assert failing_engine, "the engine never computed a merged tensor"
    assert_bad(res, tmp_path, before, code=1)


def test_failure_mid_stream_keeps_previous_output(tmp_path, failing_engine):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("complete")
    (out / ".loraport-output").write_text("{}")  # it stands for an output loraport wrote (--overwrite needs that)
    before = listing(tmp_path)
    res = cli("merge", "--base", BASE, "--adapter", PLAIN, "--out", out, "--overwrite")
    assert_bad(res, tmp_path, before, code=1)
    assert (out / "previous.txt").read_text() == "complete"


def test_weight_zero_gives_the_base_bit_exact(tmp_path):
    out = tmp_path / "out"
    res = cli("merge", "--base", BASE, "--adapter", fx("adapters", "llama_dora"), "--weight", "0", "--out", out)
    assert res.exit_code == 0, res.stderr
    base, got = load_state(BASE), load_state(out)
    assert set(got) == set(base)
    for k in base:
        assert torch.equal(got[k], base[k]), f"{k} changed at weight 0"


def test_merge_help_has_the_contract_flags():
    res = cli("merge", "--help")
    assert res.exit_code == 0
    for flag in ("--base", "--adapter", "--weight", "--out", "--dtype", "--device", "--shard-size", "--overwrite",
                 "--json"):
        assert flag in res.stdout, f"merge --help lacks {flag}"
    for choice in ("auto", "fp32", "fp16", "bf16"):
        assert choice in res.stdout
    res = cli("inspect", "--help")
    assert res.exit_code == 0 and "--json" in res.stdout
    res = cli("--help")
    for cmd in ("merge", "inspect", "demo"):
        assert cmd in res.stdout
