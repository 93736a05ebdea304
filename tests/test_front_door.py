"""What a new user meets first: `--overwrite` replaces only what loraport wrote (never a user's folder or file,
the current folder, a parent of it, $HOME or /), weight counts must match the adapters, options that would do
nothing with the chosen mode are refused, and error hints only name flags the failing command has."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from loraport.cli import main

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "fixtures" / "llm" / "bases" / "llama"
LORA = ROOT / "fixtures" / "llm" / "peft" / "llama_lora"
RSLORA = ROOT / "fixtures" / "llm" / "peft" / "llama_rslora"
KOHYA_SD = ROOT / "fixtures" / "sd" / "kohya_peft.safetensors"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(d: Path) -> dict[str, str]:
    """Every file under d (hidden ones too) with its sha256: what must not change."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def refused(r, *needles: str) -> str:
    msg = r.stderr.strip()
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output and len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def merge(out, *extra):
    return cli("merge", "--base", LLAMA, "--adapter", LORA, "--out", out, "--device", "cpu", *extra)


# ------------------------------------------------------------------------------------------------ --overwrite
def test_overwrite_refuses_a_users_folder(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    (out / "model.safetensors").write_bytes(b"not loraport's")  # looking like a model proves nothing
    before = tree(tmp_path)
    refused(merge(out, "--overwrite"), "did not write", "loraport-manifest.json")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["cwd", "parent", "grandparent"])
def test_overwrite_never_replaces_the_current_folder_or_a_parent(tmp_path, monkeypatch, where):
    top = tmp_path / "proj"
    assert merge(top).exit_code == 0  # a real loraport output: even its proof does not make cwd replaceable
    sub = top / "a" / "b"
    sub.mkdir(parents=True)
    (sub / "notes.txt").write_text("mine")
    monkeypatch.chdir(sub)
    out = {"cwd": ".", "parent": "..", "grandparent": "../.."}[where]  # ../.. is loraport's output `proj`
    if where == "cwd":
        (sub / ".loraport-output").write_text("{}")
    before = tree(tmp_path)
    what = "the current folder" if where == "cwd" else "a parent of the current folder"
    refused(merge(out, "--overwrite"), what, "never replaces")
    assert tree(tmp_path) == before


def test_overwrite_never_replaces_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".loraport-output").write_text("{}")  # even a (planted) marker does not make $HOME replaceable
    (home / ".bashrc").write_text("export X=1")
    monkeypatch.setenv("HOME", str(home))
    before = tree(tmp_path)
    refused(merge(home, "--overwrite"), "your home folder")
    assert tree(tmp_path) == before


def test_overwrite_never_replaces_root():
    refused(merge("/", "--overwrite"), "is /", "never replaces")


def test_overwrite_replaces_loraport_outputs_and_empty_folders(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()  # empty: fine
    assert merge(out, "--overwrite").exit_code == 0
    assert (out / "loraport-manifest.json").is_file()
    assert merge(out, "--overwrite", "--no-manifest").exit_code == 0  # the manifest proves it
    assert (out / ".loraport-output").is_file() and not (out / "loraport-manifest.json").exists()
    r = merge(out, "--overwrite")  # the marker of a --no-manifest output proves it
    assert r.exit_code == 0, r.stderr
    assert cli("verify", out, "--check-inputs").exit_code == 0  # the marker is not written beside a manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_overwrite_single_files_only_when_loraport_wrote_them(tmp_path):
    base = LLAMA / "model.safetensors"
    out = tmp_path / "m.safetensors"
    run = lambda *x: cli("merge", "--base", base, "--adapter", LORA, "--out", out, "--device", "cpu", *x)  # noqa: E731
    assert run("--no-manifest").exit_code == 0  # proof: loraport's stamp in the safetensors header
    assert run("--overwrite").exit_code == 0  # proof: now also the sibling manifest
    assert (tmp_path / "m.safetensors.manifest.json").is_file()
    user = tmp_path / "u.safetensors"
    save_file({"w": __import__("torch").zeros(2)}, str(user), {"format": "pt"})
    refused(cli("merge", "--base", base, "--adapter", LORA, "--out", user, "--overwrite"), "did not write")
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))  # a GGUF someone else wrote
    before = tree(tmp_path)
    refused(cli("convert", LORA, "--to", "gguf", "--base", LLAMA, "--out", gguf, "--overwrite"), "did not write")
    assert tree(tmp_path) == before
    gguf.unlink()
    for _ in range(2):  # loraport's own GGUF (its loraport.version key) is replaced
        r = cli("convert", LORA, "--to", "gguf", "--base", LLAMA, "--out", gguf, "--overwrite")
        assert r.exit_code == 0, r.stderr


def test_overwrite_applies_to_adapter_commands(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"mine")
    before = tree(tmp_path)
    for args in (["resize", LORA, "--rank", 2], ["combine", LORA, RSLORA],
                 ["extract", "--base", LLAMA, "--tuned", LLAMA, "--rank", 2],
                 ["convert", LORA, "--to", "mlx", "--base", LLAMA]):
        refused(cli(*args, "--out", out, "--overwrite"), "did not write")
    assert tree(tmp_path) == before
    shutil.rmtree(out)
    for _ in range(2):
        r = cli("resize", LORA, "--rank", 2, "--out", out, "--overwrite")
        assert r.exit_code == 0, r.stderr


# ------------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("weights,n", [(["0.7"], 2), (["0.7", "0.3"], 1)])
def test_merge_weight_count_must_match(tmp_path, weights, n):
    ads = [a for a in (LORA, RSLORA)][:n]
    args = [x for a in ads for x in ("--adapter", a)] + [x for w in weights for x in ("--weight", w)]
    refused(cli("merge", "--base", LLAMA, *args, "--out", tmp_path / "o"),
            f"{len(weights)} --weight value(s) for {n} adapter(s)")
    assert list(tmp_path.iterdir()) == []


def test_validate_weight_count_must_match(tmp_path):
    refused(cli("validate", tmp_path / "x", "--base", LLAMA, "--adapter", LORA, "--weight", 1, "--weight", 2),
            "2 --weight value(s) for 1 adapter(s)")


@pytest.mark.parametrize("args,msg", [
    (["--weight", "0.7"], "1 --weight value(s) for 2 adapter(s)"),
    (["--weight", "0.7", "--weight", "0.2", "--weight", "0.1"], "3 --weight value(s) for 2 adapter(s)"),
    (["--weights", "0.7,0.2,0.1"], "3 --weights value(s) for 2 adapter(s)"),
    (["--weight", "0.7", "--weights", "0.7,0.3"], "not both"),
])
def test_combine_weight_count_must_match(tmp_path, args, msg):
    refused(cli("combine", LORA, RSLORA, *args, "--out", tmp_path / "o"), msg)
    assert list(tmp_path.iterdir()) == []


def test_combine_takes_repeated_weight_like_merge(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("combine", LORA, RSLORA, "--weight", 0.7, "--weight", 0.3, "--method", "cat", "--out", a).exit_code == 0
    assert cli("combine", LORA, RSLORA, "--weights", "0.7,0.3", "--method", "cat", "--out", b).exit_code == 0
    ta = {k: v for k, v in tree(a).items() if k.endswith(".safetensors")}
    assert ta and ta == {k: v for k, v in tree(b).items() if k.endswith(".safetensors")}


# ------------------------------------------------------------------------------------------------ ignored options
@pytest.mark.parametrize("extra,msg", [
    (["--double-quant"], "--double-quant applies to --quantize nf4 or fp4"),
    (["--double-quant", "--quantize", "int8"], "--quantize int8 has none"),
    (["--blocksize", "128", "--quantize", "fp16"], "--blocksize applies"),
    (["--quantize", "bf16", "--dtype", "fp16"], "contradicts"),
])
def test_merge_refuses_options_the_mode_ignores(tmp_path, extra, msg):
    refused(merge(tmp_path / "o", *extra), msg)
    assert list(tmp_path.iterdir()) == []


def test_baking_refuses_options_it_ignores(tmp_path):
    refused(cli("merge", "--base", tmp_path / "m.onnx", "--adapter", LORA, "--out", tmp_path / "o.onnx",
                "--quantize", "int8", "--shard-size", "1GB"), "--shard-size, --quantize", "baking")


@pytest.mark.parametrize("args,msg", [
    (["combine", LORA, RSLORA, "--method", "svd", "--density", "0.5"], "--density applies to --method ties or dare"),
    (["combine", LORA, RSLORA, "--method", "ties", "--seed", "3"], "--seed draws dare's drop masks"),
    (["resize", LORA, "--rank", "2", "--max-rank", "1"], "--max-rank caps"),
    (["extract", "--base", LLAMA, "--tuned", LLAMA, "--rank", "2", "--svd", "full", "--seed", "1"], "--svd full"),
])
def test_lowrank_commands_refuse_options_that_do_nothing(tmp_path, args, msg):
    refused(cli(*args, "--out", tmp_path / "o"), msg)
    assert list(tmp_path.iterdir()) == []


def test_double_quant_still_works_with_nf4(tmp_path):
    r = merge(tmp_path / "o", "--quantize", "nf4", "--double-quant", "--json")
    assert r.exit_code == 0, r.stderr


# ------------------------------------------------------------------------------------------------ hints
def test_hints_name_only_flags_the_command_has(tmp_path):
    """The same reader error (an SD LoRA against a Llama base): merge has --no-strict, convert does not."""
    m = refused(cli("merge", "--base", LLAMA, "--adapter", KOHYA_SD, "--out", tmp_path / "o"), "wrong base")
    assert "--no-strict" in m
    c = refused(cli("convert", KOHYA_SD, "--to", "diffusers", "--base", LLAMA, "--out", tmp_path / "o.safetensors"),
                "wrong base")
    assert "--no-strict" not in c
    c = refused(cli("resize", KOHYA_SD, "--rank", 2, "--base", LLAMA, "--out", tmp_path / "r.safetensors"))
    assert "--no-strict" not in c


def test_verify_check_inputs_and_its_old_spelling(tmp_path):
    out = tmp_path / "o"
    assert merge(out).exit_code == 0
    for flag in ("--check-inputs", "--inputs"):
        r = cli("verify", out, flag)
        assert r.exit_code == 0 and "inputs unchanged" in r.stderr, r.stderr
