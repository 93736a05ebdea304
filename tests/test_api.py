"""The public Python API (loraport/api.py): six verbs that stay functions however the package is imported,
take the CLI's argument shapes, raise LoraportError subclasses worded in API terms, return typed results whose
`to_dict()` is the CLI's --json; a base transformers could not load is refused unless allowed; the README's
Python example runs as written."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import loraport
from loraport.errors import BadInputError, LoraportError
from tests._peft_util import cli, fx, load_state

ROOT = Path(__file__).resolve().parents[1]
BASE = fx("bases", "llama")
AD1 = fx("adapters", "llama_plain")
AD2 = fx("adapters", "llama_plain2")
VERBS = ("merge", "convert", "export_onnx", "validate", "inspect", "verify")


def _py(code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------------------------------ stable functions
REIMPORT = """
    import inspect as pyinspect, sys
    {first}
    import loraport
    from loraport.errors import LoraportError
    verbs = {verbs!r}
    def check(where):
        for v in verbs:
            f = getattr(loraport, v)
            assert pyinspect.isfunction(f), (where, v, type(f))
    check("after import")
    for i in range(2):  # the second use is where a submodule used to replace the function
        for call in (lambda: loraport.validate("/nonexistent/artifact"{more}),
                     lambda: loraport.verify("/nonexistent/out"), lambda: loraport.inspect("/nonexistent/adapter")):
            try:
                call()
            except LoraportError:
                pass
            else:
                raise SystemExit("no error for a missing input")
        check(f"after use {{i}}")
    {then}
    check("after importing the CLI")
    print("ok", "torch" in sys.modules)
"""


@pytest.mark.parametrize("first,then,more", [
    ("import loraport.merging, loraport.parity, loraport.conversion, loraport.inspection, loraport.results",
     "import loraport.cli, loraport.commands.inspect, loraport.commands.verify, loraport.commands.merge", ""),
    # without torch (fails on batch=0 before the engine loads): the star import, then the submodules
    (f"from loraport import *; assert all(pyinspect.isfunction(globals()[v]) for v in {VERBS!r})",
     "import loraport.onnx, loraport.api, loraport.inspection, loraport.hub; from loraport import *; "
     "assert pyinspect.isfunction(merge) and pyinspect.isfunction(inspect)", ", batch=0"),
])
def test_verbs_stay_functions_in_a_fresh_interpreter(first, then, more):
    r = _py(REIMPORT.format(first=first, then=then, verbs=VERBS, more=more))
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


def test_import_stays_light_and_no_submodule_is_named_like_a_verb():
    import pkgutil

    assert not {m.name for m in pkgutil.iter_modules(loraport.__path__)} & set(VERBS)
    assert set(VERBS) | {"load_adapter", "LoraportError"} <= set(loraport.__all__)
    r = _py("import sys, loraport; print(sorted(m for m in ('torch', 'numpy', 'transformers', 'rich') "
            "if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ argument shapes
def test_merge_takes_cli_shapes_and_returns_a_typed_result(tmp_path):
    res = loraport.merge(BASE, [str(AD1), (AD2, 0.5)], tmp_path / "m", dtype=torch.float16, shard_size="40KB")
    assert isinstance(res, loraport.MergeResult)
    assert len(res.files) > 1 and all((res.out / f).is_file() for f in res.files)  # 40 kB shards
    assert 0 < res.bytes <= sum((res.out / f).stat().st_size for f in res.files)
    assert [a["weight"] for a in res.adapters] == [1.0, 0.5] and res.manifest.is_file()
    state = {k: v for f in res.files for k, v in load_state(res.out / f).items()}
    assert {v.dtype for v in state.values()} == {torch.float16}
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.out = Path("elsewhere")
    one = loraport.merge(BASE, AD1, tmp_path / "one", shard_size=10**9)  # a single path is one adapter
    assert [a["weight"] for a in one.adapters] == [1.0] and one.files == ("model.safetensors",)


def test_cli_json_is_the_results_dict(tmp_path):
    r = cli("merge", "--base", BASE, "--adapter", AD1, "--weight", "0.5", "--out", tmp_path / "cli", "--json")
    assert r.exit_code == 0, r.output
    via_cli = json.loads(r.stdout)
    via_api = loraport.merge(BASE, [(AD1, 0.5)], tmp_path / "api").to_dict()
    assert set(via_cli) == set(via_api)
    for k in ("files", "bytes_written", "adapters", "tensors_updated", "warnings", "dtype"):
        assert via_cli[k] == via_api[k], k
    rep = loraport.verify(tmp_path / "cli")
    r = cli("verify", tmp_path / "cli", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout).keys() == rep.to_dict().keys()
    ins = loraport.inspect(AD1)
    r = cli("inspect", AD1, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == json.loads(json.dumps(ins.to_dict(), default=str))


@pytest.mark.parametrize("kwargs,words", [
    ({"shard_size": "5 parsecs"}, "shard_size"),
    ({"shard_size": -3}, "shard_size"),
    ({"shard_size": True}, "shard_size"),
    ({"dtype": "int3"}, "dtype"),
    ({"adapters": [(AD1, "heavy")]}, "weight"),
    ({"adapters": [(AD1, float("nan"))]}, "finite"),
    ({"adapters": [42]}, "(path, weight)"),
    ({"adapters": []}, "no adapters"),
])
def test_bad_arguments_raise_loraport_errors_in_api_terms(tmp_path, kwargs, words):
    args = {"base": BASE, "adapters": [AD1], "out": tmp_path / "o", **kwargs}
    with pytest.raises(BadInputError) as e:
        loraport.merge(**args)
    assert words in str(e.value) and "--" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_engine_messages_name_arguments_in_python_and_flags_in_the_cli(tmp_path):
    single = fx("bases", "conv", "model.safetensors")
    conv = fx("adapters", "conv_lora")
    with pytest.raises(BadInputError, match=r"shard_size applies") as e:
        loraport.merge(single, conv, tmp_path / "o.safetensors", shard_size="1MB")
    assert "--shard-size" not in str(e.value)
    r = cli("merge", "--base", single, "--adapter", conv, "--out", tmp_path / "o.safetensors", "--shard-size", "1MB")
    assert r.exit_code == 2 and "--shard-size applies" in r.stderr
    assert loraport.api.api_wording("pass --no-strict or --allow-incomplete, see --fp16-base") == \
        "pass strict=False or allow_incomplete=True, see fp16_base"
    assert loraport.api.api_wording("--base x: run `hf download a/b --local-dir ./b`") == \
        "base x: run `hf download a/b --local-dir ./b`"


def test_inspect_verify_and_validate_results(tmp_path):
    ins = loraport.inspect(AD1)
    assert isinstance(ins, loraport.InspectResult) and ins.kind == "adapter" and ins.format == "peft"
    assert ins["targets"] > 0
    res = loraport.merge(BASE, [AD1], tmp_path / "m")
    prov = loraport.inspect(res.out)
    assert prov.kind == "merged-output" and prov.provenance["loraport.adapters"][0]["weight"] == 1.0
    rep = loraport.validate(res.out, BASE, [AD2])  # the wrong adapter: outside tolerance
    assert isinstance(rep, loraport.ValidationReport) and not rep.passed and rep.failed_cases() == ["merged"]
    with pytest.raises(loraport.errors.ValidationFailed):
        rep.raise_if_failed()
    with pytest.raises(BadInputError, match="batch"):
        loraport.validate(res.out, BASE, [AD1], batch=0)
    ok = loraport.verify(res.out)
    assert isinstance(ok, loraport.VerifyResult) and ok.ok and ok.files_checked >= 2
    (res.out / "config.json").write_text("{}")  # tampered after the merge
    bad = loraport.verify(res.out)
    assert not bad.ok and any("config.json" in p for p in bad.problems)


def test_convert_takes_one_adapter_and_refuses_onnx_options(tmp_path):
    res = loraport.convert(AD1, "mlx", tmp_path / "k", base=BASE)
    assert isinstance(res, loraport.ConvertResult) and res.out.exists() and res.source_format == "peft"
    with pytest.raises(BadInputError, match="opset"):
        loraport.convert(AD1, "kohya", tmp_path / "k2.safetensors", opset=17)
    with pytest.raises(BadInputError, match="one adapter"):
        loraport.convert([AD1, AD2], "kohya", tmp_path / "k3.safetensors")


# ------------------------------------------------------------------------------------------ loadable outputs
def _copy_base(tmp_path: Path, drop: tuple[str, ...] = (), config: dict | None = None) -> Path:
    b = tmp_path / "base"
    shutil.copytree(BASE, b)
    for f in drop:
        (b / f).unlink()
    if config is not None:
        (b / "config.json").write_text(json.dumps(config))
    return b


def test_base_without_config_is_refused_unless_allowed(tmp_path):
    b = _copy_base(tmp_path, drop=("config.json",))
    before = sorted(p.name for p in b.iterdir())
    with pytest.raises(BadInputError, match=r"no config\.json.*allow_incomplete=True") as e:
        loraport.merge(b, [AD1], tmp_path / "o")
    assert "--allow" not in str(e.value) and not (tmp_path / "o").exists()
    r = cli("merge", "--base", b, "--adapter", AD1, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "config.json" in r.stderr and "--allow-incomplete" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert sorted(p.name for p in b.iterdir()) == before
    res = loraport.merge(b, [AD1], tmp_path / "o", allow_incomplete=True)
    assert (res.out / "model.safetensors").is_file() and not (res.out / "config.json").exists()
    r = cli("merge", "--base", b, "--adapter", AD1, "--out", tmp_path / "o2", "--allow-incomplete")
    assert r.exit_code == 0, r.output


def test_config_without_model_type_is_refused(tmp_path):
    cfg = json.loads((BASE / "config.json").read_text())
    cfg.pop("model_type")
    b = _copy_base(tmp_path, config=cfg)
    with pytest.raises(BadInputError, match="model_type"):
        loraport.merge(b, [AD1], tmp_path / "o")


def test_single_file_base_needs_no_config(tmp_path):
    res = loraport.merge(fx("bases", "conv", "model.safetensors"), fx("adapters", "conv_lora"),
                         tmp_path / "o.safetensors")
    assert res.out.is_file()


# ------------------------------------------------------------------------------------------ README
def test_readme_python_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Python\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for name in re.findall(r'"\./([\w.-]+)"', code):
        assert name in ("Llama-3-8B", "style", "domain", "merged"), name
    shutil.copytree(BASE, tmp_path / "Llama-3-8B")  # the example's paths, filled with the tiny fixtures
    shutil.copytree(AD1, tmp_path / "style")
    shutil.copytree(AD2, tmp_path / "domain")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_export_onnx_takes_plain_paths(tmp_path):
    """export_onnx takes the adapters as merge does (paths and pairs). Slow: an ONNX capture
    (run with `pytest -m slow tests/test_api.py`)."""
    pytest.importorskip("onnxscript")
    res = loraport.export_onnx(BASE, [AD1, (AD2, 0.5)], tmp_path / "onnx")
    assert isinstance(res, loraport.ExportResult) and (res.out / "model.onnx").is_file()
    assert [a.get("weight") for a in res["adapters"]] == [1.0, 0.5]


def test_errors_are_loraport_errors():
    with pytest.raises(LoraportError):
        loraport.export_onnx(BASE, [("/nonexistent/adapter", 1.0)], "/nonexistent/out")
