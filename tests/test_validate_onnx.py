"""`loraport validate`: the reference (base + unmerged adapter hooks) equals PEFT; artifacts pass; a corrupted
weight fails with exit 1; bad input exits 2."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from tests._onnx_util import ADAPTERS, GPT2, LLAMA, cli, export_kw, feeds, hf_model, max_abs, peft_logits, workdir

PLAIN = ADAPTERS / "llama_plain"
PLAIN2 = ADAPTERS / "llama_plain2"


@pytest.mark.parametrize("base,adapter", [(LLAMA, "llama_plain"), (LLAMA, "llama_dora"), (LLAMA, "llama_embed"),
                                          (GPT2, "gpt2_conv1d")])
def test_reference_hooks_equal_peft(base, adapter):
    from loraport.checkpoint import Checkpoint
    from loraport.formats import load_adapter
    from loraport.parity import attach_unmerged, reference_logits

    f = feeds(2, 8, seed=2)
    ck = Checkpoint.open(base)
    m = hf_model(base)
    before = reference_logits(m, f)
    h = attach_unmerged(m, ck, [(load_adapter(ADAPTERS / adapter, base=ck), 1.0)])
    got = reference_logits(m, f)
    h.remove()
    ref = peft_logits(base, ADAPTERS / adapter, f)
    assert max_abs(ref, before) > 1e-3
    assert max_abs(got, ref) <= 1e-5
    assert max_abs(reference_logits(m, f), before) <= 1e-6  # hooks removed cleanly


def _validate(*args):
    r = cli("validate", *map(str, args), "--json")
    rep = json.loads(r.stdout) if r.stdout.strip() else None
    return r, rep


def _api(artifact, adapters, **kw):
    from loraport.parity import validate

    return validate(artifact, LLAMA, [(a, 1.0) for a in adapters], **kw)


def test_validate_merged_onnx_passes_and_reports_providers():
    out = export_kw(LLAMA, [(PLAIN, 1.0)])
    rep = _api(out, [PLAIN])
    assert rep["passed"] and rep["providers"] == ["CPUExecutionProvider"]
    assert rep["qdq_matmulnbits_accuracy_level"] == "0"
    assert rep["tolerance"]["mode"] == "auto" and rep["tolerance"]["precision"] == "fp32"
    m = rep["cases"][0]["outputs"]["logits"]
    assert m["max_abs"] <= 1e-4 and m["top1_agreement"] == 1.0 and m["cosine"] > 0.99999


def test_validate_fails_on_corrupted_weight():
    src = export_kw(LLAMA, [(PLAIN, 1.0)])
    bad = workdir("corrupt") / "onnx"
    if not bad.exists():
        shutil.copytree(src, bad)
        m = onnx.load(str(bad / "model.onnx"), load_external_data=False)
        t = next(t for t in m.graph.initializer if t.name == "model.layers.0.self_attn.q_proj.weight")
        info = {e.key: int(e.value) if e.key != "location" else e.value for e in t.external_data}
        with open(bad / info["location"], "r+b") as fh:  # scale 64 floats of the weight by 50
            import numpy as np

            fh.seek(info["offset"])
            vals = np.frombuffer(fh.read(256), dtype=np.float32) * 50
            fh.seek(info["offset"])
            fh.write(vals.tobytes())
    r, rep = _validate(bad, "--base", LLAMA, "--adapter", PLAIN)
    assert r.returncode == 1, r.stderr
    assert rep["passed"] is False and "outside tolerance" in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_multi_lora_every_adapter_and_none():
    out = export_kw(LLAMA, [(PLAIN, 1.0), (PLAIN2, 1.0)], multi_lora=True)
    rep = _api(out, [PLAIN, PLAIN2])
    assert rep["passed"]
    assert [c["case"] for c in rep["cases"]] == ["none", "llama_plain", "llama_plain2"]
    assert all(c["outputs"]["logits"]["max_abs"] <= 1e-4 for c in rep["cases"])
    rep = _api(out, [PLAIN, PLAIN2], active="llama_plain2")
    assert rep["passed"] and [c["case"] for c in rep["cases"]] == ["llama_plain2"]


def test_validate_quantized_states_bound_and_fixed_tolerance_can_fail():
    out = export_kw(LLAMA, [(PLAIN, 1.0)], quantize="int8")
    rep = _api(out, [PLAIN])
    assert rep["passed"], rep["cases"]
    assert rep["precision"] == "int8" and "int8" in rep["tolerance"]["why"]
    rep = _api(out, [PLAIN], tolerance="1e-6")
    assert not rep["passed"] and rep["tolerance"]["mode"] == "fixed"


def test_validate_merged_safetensors_folder():
    from loraport.merging import merge

    out = workdir("st-merge") / "merged"
    if not out.exists():
        merge(LLAMA, [(PLAIN, 1.0)], out)
    rep = _api(out, [PLAIN])
    assert rep["passed"], rep["cases"]
    assert rep["kind"] == "safetensors" and rep["providers"] == ["torch-cpu"]
    # the same folder is not base+plain2: validate must notice
    assert not _api(out, [PLAIN2])["passed"]


def test_validate_bad_input_exit_2(tmp_path):
    from loraport.errors import BadInputError

    r = cli("validate", str(tmp_path / "nope"), "--base", str(LLAMA))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not found" in r.stderr
    out = export_kw(LLAMA, [(PLAIN, 1.0)])
    with pytest.raises(BadInputError, match="--tolerance"):
        _api(out, [PLAIN], tolerance="tight")
    with pytest.raises(BadInputError, match="--active"):
        _api(out, [PLAIN], active="qa")


@pytest.mark.gpu
def test_validate_on_cuda_provider():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install onnxruntime-gpu instead)")
    out = export_kw(LLAMA, [(PLAIN, 1.0)])
    rep = _api(out, [PLAIN], provider="cuda")
    assert rep["providers"][0] == "CUDAExecutionProvider"
    assert rep["passed"], rep["cases"]
