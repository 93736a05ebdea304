"""Fidelity of `loraport merge` against PEFT itself (issue 2).

For every case the oracle is computed here, at test time, by live PEFT on the committed tiny bases and
PEFT-made adapters (fixtures/peft/, made by fixtures/makers/peft.py): `PeftModel.from_pretrained(base,
adapter).merge_and_unload()`. Two weighted adapters: W + w1·(M1 − W) + w2·(M2 − W), with Mi PEFT's merge of
adapter i alone, computed in fp32. The merged output must equal it (fp32: max |Δ| ≤ 1e-5; bf16: ≤ 1 ulp), load
in transformers and give PEFT's logits, mirror the base's layout, carry its non-weight files, and record
provenance that `inspect` shows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from _peft_util import (
    base_kind,
    cli,
    forward,
    fx,
    load_base_model,
    load_state,
    max_abs,
    metadata,
    peft_merged,
    sample_input,
    ulps_bf16,
)

pytest.importorskip("peft")
pytest.importorskip("transformers")

FP32_TOL = 1e-5

# case -> (base folder/file, [(adapter, weight)])
CASES: dict[str, tuple[str, list[tuple[str, float]]]] = {
    "plain": ("llama", [("llama_plain", 1.0)]),
    "rslora_patterns": ("llama", [("llama_rslora_patterns", 1.0)]),
    "dora_linear_embedding": ("llama", [("llama_dora", 1.0)]),
    "embedding": ("llama", [("llama_embed", 1.0)]),
    "modules_to_save": ("llama", [("llama_mts", 1.0)]),
    "conv1d": ("gpt2", [("gpt2_conv1d", 1.0)]),
    "conv1d_dora": ("gpt2", [("gpt2_dora", 1.0)]),
    "bf16_qwen2": ("qwen2_bf16", [("qwen2_plain", 1.0)]),
    "tied_head_bf16": ("qwen2_bf16", [("qwen2_tied_head", 1.0)]),
    "dora_bf16_tied_embedding": ("qwen2_bf16", [("qwen2_dora_bf16", 1.0)]),
    "tied_embedding_gpt2": ("gpt2", [("gpt2_tied_embed", 1.0)]),
    "sharded": ("llama_sharded", [("llama_plain", 1.0)]),
    "two_weighted": ("llama", [("llama_plain", 0.7), ("llama_rslora_patterns", -0.4)]),
    "two_weighted_sharded": ("llama_sharded", [("llama_plain2", 1.5), ("llama_dora", 0.5)]),
    "conv2d": ("conv/model.safetensors", [("conv_lora", 1.0)]),
    "conv2d_dora": ("conv/model.safetensors", [("conv_dora", 1.0)]),
}
CAUSAL = [c for c, (b, _) in CASES.items() if not b.endswith(".safetensors")]


def base_path(case: str) -> Path:
    return fx("bases", *CASES[case][0].split("/"))


def adapter_path(name: str) -> Path:
    return fx("adapters", name)


def out_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def is_bf16(case: str) -> bool:
    return "bf16" in CASES[case][0]


# --- cached runs -----------------------------------------------------------------------------------
_RUNS: dict[str, tuple[Path, dict]] = {}
_ORACLES: dict[str, dict[str, torch.Tensor]] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peft_fidelity")


def run_merge(case: str, workdir: Path) -> tuple[Path, dict]:
    """`loraport merge --json` for the case (once per module); returns (out path, parsed JSON summary)."""
    if case in _RUNS:
        return _RUNS[case]
    base = base_path(case)
    parent = workdir / case
    parent.mkdir()
    out = parent / ("merged.safetensors" if base.is_file() else "merged")
    args = ["merge", "--base", base, "--out", out, "--json"]
    for a, w in CASES[case][1]:
        args += ["--adapter", adapter_path(a), "--weight", repr(w)]
    res = cli(*args)
    assert res.exit_code == 0, f"{case}: exit {res.exit_code}\nstderr: {res.stderr}\nexc: {res.exception!r}"
    _RUNS[case] = (out, json.loads(res.stdout))
    return _RUNS[case]


def oracle(case: str) -> dict[str, torch.Tensor]:
    """The expected merged state dict (in the base dtype), from live PEFT."""
    if case in _ORACLES:
        return _ORACLES[case]
    base = base_path(case)
    adapters = CASES[case][1]
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        sd = {k: v.detach().clone() for k, v in peft_merged(base, adapter_path(adapters[0][0])).state_dict().items()}
    else:
        w0 = {k: v.detach().clone() for k, v in load_base_model(base).state_dict().items()}
        acc = {k: v.float().clone() for k, v in w0.items()}
        for a, w in adapters:
            mi = peft_merged(base, adapter_path(a)).state_dict()
            for k in acc:
                acc[k] += w * (mi[k].float() - w0[k].float())
        sd = {k: acc[k].to(w0[k].dtype) for k in acc}
    _ORACLES[case] = sd
    return sd


def assert_close(case: str, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, f"{case} {name}: dtype {got.dtype}, PEFT {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{case} {name}: shape {tuple(got.shape)}, PEFT {tuple(want.shape)}"
    if want.dtype == torch.bfloat16:
        u = ulps_bf16(got, want)
        assert u <= 1.0, f"{case} {name}: {u:.2f} bf16 ulps from PEFT (max abs {max_abs(got, want):.3g})"
    else:
        d = max_abs(got, want)
        assert d <= FP32_TOL, f"{case} {name}: max abs diff {d:.3g} from PEFT > {FP32_TOL}"


# --- the tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_merged_tensors_equal_peft(case, workdir):
    out, _ = run_merge(case, workdir)
    got = load_state(out)
    base = load_state(base_path(case))
    want = oracle(case)
    assert set(got) == set(base), f"{case}: output tensors differ from the base's: " \
        f"missing {sorted(set(base) - set(got))[:5]}, extra {sorted(set(got) - set(base))[:5]}"
    changed = 0
    for name, t in got.items():
        assert name in want, f"{case}: {name} not in PEFT's merged state dict"
        assert_close(case, name, t, want[name])
        if torch.equal(want[name], base[name]):
            assert torch.equal(t, base[name]), f"{case}: {name} is untouched by the adapter but not bit-exact"
        else:
            changed += 1
    assert changed > 0, f"{case}: the oracle changed no tensor — the fixture proves nothing"


@pytest.mark.parametrize("case", [c for c in CASES if is_bf16(c)])
def test_bf16_rounded_once_from_fp32(case, workdir):
    """The delta is computed in fp32 and rounded once: equal (≤ 1 ulp) to PEFT's fp32 merge of the upcast
    base, rounded to bf16."""
    out, _ = run_merge(case, workdir)
    got = load_state(out)
    (a, w), = CASES[case][1]
    ref32 = peft_merged(base_path(case), adapter_path(a), dtype=torch.float32).state_dict()
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        u = ulps_bf16(t, ref32[name].to(torch.bfloat16))
        assert u <= 1.0, f"{case} {name}: {u:.2f} bf16 ulps from fp32-merge-then-round"


@pytest.mark.parametrize("case", CAUSAL)
def test_loads_in_transformers_with_peft_logits(case, workdir):
    from transformers import AutoModelForCausalLM

    out, _ = run_merge(case, workdir)
    ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = load_base_model(base_path(case), dtype=torch.float32)
    res = ref.load_state_dict({k: v.float() for k, v in oracle(case).items()}, strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    plain = load_base_model(base_path(case), dtype=torch.float32)
    x = sample_input(base_path(case))
    lo, lr, lb = forward(ours, x), forward(ref, x), forward(plain, x)
    assert max_abs(lr, lb) > 1e-3, f"{case}: the adapter does not change the logits — the case proves nothing"
    tol = 1e-4 if not is_bf16(case) else 2e-2 * (1 + lr.abs().max().item())
    d = max_abs(lo, lr)
    assert d <= tol, f"{case}: logits differ from PEFT-merged by {d:.3g} (tol {tol:.3g})"
    # the config the output carries is the base's own: tying and dtype survive a reload
    assert ours.config.tie_word_embeddings == plain.config.tie_word_embeddings


@pytest.mark.parametrize("case", [c for c in CASES if c not in CAUSAL])
def test_conv_model_runs_with_peft_outputs(case, workdir):
    out, _ = run_merge(case, workdir)
    ours = load_base_model(out)  # TinyConvNet.load_state_dict(strict=True) on the merged file
    ref = load_base_model(base_path(case))
    ref.load_state_dict(oracle(case), strict=True)
    plain = load_base_model(base_path(case))
    x = sample_input(base_path(case))
    lo, lr, lb = forward(ours, x), forward(ref, x), forward(plain, x)
    assert max_abs(lr, lb) > 1e-3
    assert max_abs(lo, lr) <= 1e-4, f"{case}: outputs differ from PEFT-merged by {max_abs(lo, lr):.3g}"


def _tree(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_mirrors_base(case, workdir):
    out, _ = run_merge(case, workdir)
    base = base_path(case)
    # loraport's integrity manifest (loraport/manifest.py) is the one file allowed beyond the base's own
    siblings = sorted(p.name for p in out.parent.iterdir())
    assert siblings in ([out.name], sorted([out.name, out.name + ".manifest.json"])), \
        f"{case}: leftovers next to the output: {siblings}"
    if base.is_file():
        assert out.is_file(), f"{case}: a single-file base must give a single file"
        return
    bt, ot = _tree(base), _tree(out)
    extra = set(ot) - set(bt)
    assert not set(bt) - set(ot) and extra <= {"loraport-manifest.json"}, \
        f"{case}: files differ: missing {sorted(set(bt) - set(ot))}, extra {sorted(extra)}"
    for rel, p in bt.items():
        if rel.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(p), "pt") as fb, safe_open(str(ot[rel]), "pt") as fo:
                assert set(fb.keys()) == set(fo.keys()), f"{case}: shard {rel} holds other tensors"
        elif rel.endswith(".index.json"):
            wb, wo = json.loads(p.read_text()), json.loads(ot[rel].read_text())
            assert wo["weight_map"] == wb["weight_map"], f"{case}: index weight_map differs"
        else:
            assert ot[rel].read_bytes() == p.read_bytes(), f"{case}: non-weight file {rel} not copied as is"


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["plain", "two_weighted_sharded", "conv2d_dora"])
def test_provenance_recorded_and_inspected(case, workdir):
    out, _ = run_merge(case, workdir)
    shas = [_sha256(adapter_path(a) / "adapter_model.safetensors") for a, _ in CASES[case][1]]
    for f in out_files(out):
        md = metadata(f)
        prov = {k: v for k, v in md.items() if k.startswith("loraport.")}
        assert prov, f"{case}: {f.name} has no loraport.* metadata (has {sorted(md)})"
        text = " ".join(prov.values())
        for s in shas:
            assert s in text, f"{case}: {f.name} provenance lacks the adapter sha256 {s[:12]}…"
        if base_kind(base_path(case)) == "causal":
            assert md.get("format") == "pt", f"{case}: {f.name} lost the base's format=pt metadata"
    for args in (["inspect", out], ["inspect", out, "--json"]):
        res = cli(*args)
        assert res.exit_code == 0, f"{' '.join(map(str, args))}: exit {res.exit_code}: {res.stderr}"
        assert all(s in res.stdout + res.stderr for s in shas), f"inspect {args[2:]} does not show provenance"
    json.loads(cli("inspect", out, "--json").stdout)


def test_json_summary(workdir):
    out, rep = run_merge("two_weighted", workdir)
    assert isinstance(rep, dict)
    blob = json.dumps(rep)
    assert str(out) in blob or out.name in blob
    for a, _ in CASES["two_weighted"][1]:
        assert a in blob, f"summary does not name adapter {a}"
    assert "-0.4" in blob and "0.7" in blob, "summary does not carry the weights"


def test_inputs_unchanged(workdir):
    """Merging never modifies the base or the adapters."""
    case = "two_weighted_sharded"
    files = [*(_tree(base_path(case)).values()), *(p for a, _ in CASES[case][1] for p in adapter_path(a).iterdir())]
    before = {p: _sha256(p) for p in files}
    run_merge(case, workdir)
    assert {p: _sha256(p) for p in files} == before


def test_python_api_matches_peft(tmp_path):
    import loraport

    out = tmp_path / "api_out"
    rep = loraport.merge(base_path("rslora_patterns"), [(adapter_path("llama_rslora_patterns"), 1.0)], out)
    assert isinstance(rep, loraport.MergeResult) and rep.out == out  # a typed result since the API redesign
    want = oracle("rslora_patterns")
    for name, t in load_state(out).items():
        assert_close("api", name, t, want[name])


def test_bin_adapter_equals_peft(tmp_path):
    """adapter_model.bin (read with torch.load(weights_only=True)) merges exactly like the safetensors one."""
    src = adapter_path("llama_dora")
    ad = tmp_path / "bin_adapter"
    ad.mkdir()
    shutil.copy(src / "adapter_config.json", ad / "adapter_config.json")
    torch.save(load_state(src / "adapter_model.safetensors"), ad / "adapter_model.bin")
    out = tmp_path / "out"
    res = cli("merge", "--base", base_path("plain"), "--adapter", ad, "--out", out)
    assert res.exit_code == 0, res.stderr
    want = peft_merged(base_path("plain"), ad).state_dict()
    for name, t in load_state(out).items():
        assert_close("bin", name, t, want[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapter_equals_peft(dtype, tmp_path):
    """Adapters saved in bf16/fp16 (common from trainers): factors are upcast exactly, result as PEFT's."""
    from safetensors.torch import save_file

    src = adapter_path("llama_dora")
    ad = tmp_path / "half_adapter"
    shutil.copytree(src, ad)
    save_file({k: v.to(dtype) for k, v in load_state(src / "adapter_model.safetensors").items()},
              str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    res = cli("merge", "--base", base_path("plain"), "--adapter", ad, "--out", out)
    assert res.exit_code == 0, res.stderr
    want = peft_merged(base_path("plain"), ad).state_dict()
    for name, t in load_state(out).items():
        assert_close(f"{dtype} adapter", name, t, want[name])


def _ulps(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    g, r = got.float(), ref.float()
    ax = torch.maximum(g.abs(), r.abs()).clamp_min(torch.finfo(dtype).tiny)
    return ((g - r).abs() / torch.exp2(torch.floor(torch.log2(ax)) - mant)).max().item()


@pytest.mark.parametrize("flag,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_flag_rounds_fp32_merge_once(flag, dtype, tmp_path):
    out = tmp_path / "out"
    res = cli("merge", "--base", base_path("plain"), "--adapter", adapter_path("llama_dora"), "--out", out,
              "--dtype", flag)
    assert res.exit_code == 0, res.stderr
    ref = peft_merged(base_path("plain"), adapter_path("llama_dora"), dtype=torch.float32).state_dict()
    for name, t in load_state(out).items():
        assert t.dtype == dtype, f"--dtype {flag}: {name} is {t.dtype}"
        u = _ulps(t, ref[name].to(dtype), dtype)
        assert u <= 1.0, f"--dtype {flag}: {name} is {u:.2f} ulps from PEFT's fp32 merge rounded once"


def test_dtype_fp32_from_bf16_base_keeps_fp32_delta(tmp_path):
    out = tmp_path / "out"
    res = cli("merge", "--base", base_path("bf16_qwen2"), "--adapter", adapter_path("qwen2_plain"), "--out", out,
              "--dtype", "fp32")
    assert res.exit_code == 0, res.stderr
    ref = peft_merged(base_path("bf16_qwen2"), adapter_path("qwen2_plain"), dtype=torch.float32).state_dict()
    for name, t in load_state(out).items():
        assert_close("bf16->fp32", name, t, ref[name])


def test_shard_size_reshards_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    res = cli("merge", "--base", base_path("plain"), "--adapter", adapter_path("llama_plain"), "--out", out,
              "--shard-size", "40KB")
    assert res.exit_code == 0, res.stderr
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1, f"--shard-size 40KB gave {[s.name for s in shards]}"
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"].values()) == {s.name for s in shards}
    from safetensors import safe_open

    for s in shards:
        with safe_open(str(s), "pt") as f:
            nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
            assert nbytes <= 40_000 or len(list(f.keys())) == 1, f"{s.name}: {nbytes} bytes of tensors > 40KB"
    ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = peft_merged(base_path("plain"), adapter_path("llama_plain"), dtype=torch.float32)
    x = sample_input(base_path("plain"))
    assert max_abs(forward(ours, x), forward(ref, x)) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["dora_linear_embedding", "conv1d_dora", "conv2d_dora", "two_weighted"])
def test_cuda_matches_cpu_and_peft(case, tmp_path):
    outs = {}
    for dev in ("cpu", "cuda"):
        base = base_path(case)
        out = tmp_path / dev / ("m.safetensors" if base.is_file() else "m")
        out.parent.mkdir()
        args = ["merge", "--base", base, "--out", out, "--device", dev]
        for a, w in CASES[case][1]:
            args += ["--adapter", adapter_path(a), "--weight", repr(w)]
        res = cli(*args)
        assert res.exit_code == 0, res.stderr
        outs[dev] = load_state(out)
    want = oracle(case)
    for name, t in outs["cuda"].items():
        assert max_abs(t, outs["cpu"][name]) <= FP32_TOL, f"{case} {name}: cuda vs cpu"
        assert_close(case + "@cuda", name, t, want[name])
