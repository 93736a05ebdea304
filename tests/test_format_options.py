"""The format registry declares each reader's and writer's options (issue 16): a misspelled option or a value
outside its choices is refused with one line naming the valid ones — from Python and from the CLI — before
anything is written; declared options reach the reader / writer; and the CLI's format lists are the registry's.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import loraport
from loraport.errors import BadInputError, Inexpressible
from loraport.formats import (
    AdapterFormat,
    ReadOptions,
    WriteOptions,
    convert_targets,
    export_targets,
    formats,
    get_format,
    load_adapter,
    register,
)
from tests._llm_util import LLAMA, LLM
from _peft_util import cli, fx

PLAIN = fx("adapters", "llama_plain")  # a PEFT adapter on the tiny llama base
ALPHA_ERA = LLM / "mlx" / "llama_alpha_era"  # an MLX adapter whose config has the alpha-era lora_parameters.alpha


# --- the registry's declarations --------------------------------------------------------------------------
def test_every_format_declares_frozen_option_types():
    assert formats(), "no format registered"
    for name, f in formats().items():
        for kind, root in ((f.read_options, ReadOptions), (f.write_options, WriteOptions)):
            assert dataclasses.is_dataclass(kind) and issubclass(kind, root), (name, kind)
            assert kind.__dataclass_params__.frozen, (name, kind)
        # writable exactly when it was registered with a writer that it implements
        implements = f.write_with.__func__ is not AdapterFormat.write_with.__func__
        assert f.writable == implements, name
        assert f.output_is_dir in (True, False, None), name


def test_register_refuses_untyped_options_and_a_writer_without_write_with():
    @dataclasses.dataclass  # neither frozen nor a ReadOptions
    class Loose:
        strict: bool = True

    class Bad(AdapterFormat):
        name = "test-bad-options"

    with pytest.raises(TypeError, match="frozen dataclass"):
        register(Bad, read=Loose)
    with pytest.raises(TypeError, match="write_with"):
        register(Bad, write=WriteOptions)
    assert "test-bad-options" not in formats()


# --- refused from Python ----------------------------------------------------------------------------------
def test_unknown_read_option_refused_naming_the_valid_ones():
    with pytest.raises(BadInputError) as e:
        load_adapter(PLAIN, mlx_alpah="apply")
    msg = str(e.value)
    assert "'mlx_alpah'" in msg and "peft" in msg and "valid: strict" in msg and "\n" not in msg
    with pytest.raises(BadInputError, match="valid: strict, force, mlx_alpha"):
        load_adapter(ALPHA_ERA, format="mlx", mlx_alpah="apply")


def test_option_value_outside_its_choices_refused():
    with pytest.raises(BadInputError, match="mlx_alpha='aply'.*'ignore', 'apply'"):
        load_adapter(ALPHA_ERA, format="mlx", mlx_alpha="aply")


def test_unknown_write_option_refused_before_writing(tmp_path):
    ad = load_adapter(PLAIN)
    with pytest.raises(BadInputError, match="'bak'.*valid: bake, unet_names"):
        get_format("kohya").write(ad, tmp_path / "k.safetensors", bak=True)
    with pytest.raises(BadInputError, match="bake='yes'.*True or False"):
        get_format("kohya").write(ad, tmp_path / "k.safetensors", bake="yes")
    with pytest.raises(BadInputError, match="'bake'.*valid: none"):
        get_format("peft").write(ad, tmp_path / "p", bake=True)
    assert not any(tmp_path.iterdir())

    out = tmp_path / "out.gguf"
    with pytest.raises(BadInputError, match="'arc'.*valid: arch"):
        loraport.convert(PLAIN, "gguf", out, base=LLAMA, write_options={"arc": "llama"})
    with pytest.raises(BadInputError, match="'mlx_alpha'.*peft"):
        loraport.convert(PLAIN, "mlx", tmp_path / "m", read_options={"mlx_alpha": "apply"})
    with pytest.raises(BadInputError, match="ONNX export"):
        loraport.convert(PLAIN, "onnx", tmp_path / "o", base=LLAMA, write_options={"bake": True})
    assert not any(tmp_path.iterdir()), "a refused option left an output behind"


def test_declared_read_option_reaches_the_reader(tmp_path):
    """convert's read_options are the reader's: mlx_alpha=apply scales every module by alpha/rank."""
    ignore = loraport.convert(ALPHA_ERA, "peft", tmp_path / "ignore", base=LLAMA)
    apply = loraport.convert(ALPHA_ERA, "peft", tmp_path / "apply", base=LLAMA, read_options={"mlx_alpha": "apply"})
    assert ignore.report["max_abs_diff"] == 0.0 and apply.report["max_abs_diff"] == 0.0
    a = {d.target: d for d in load_adapter(tmp_path / "apply").deltas}
    i = {d.target: d for d in load_adapter(tmp_path / "ignore").deltas}
    assert set(a) == set(i) and a
    cfg = loraport.load_adapter(ALPHA_ERA).config["lora_parameters"]
    ratio = cfg["alpha"] / cfg["rank"]
    assert ratio != 1.0
    for t in a:
        assert a[t].scale == pytest.approx(i[t].scale * ratio, rel=1e-6), t


# --- refused from the CLI ---------------------------------------------------------------------------------
def test_cli_unknown_options_refused_with_one_line(tmp_path):
    out = tmp_path / "k.safetensors"
    r = cli("convert", PLAIN, "--to", "kohya", "--out", out, "--write-option", "bak=true")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'bak'" in lines[0] and "bake, unet_names" in lines[0], r.stderr
    assert "Traceback" not in r.output
    r = cli("convert", PLAIN, "--to", "peft", "--out", tmp_path / "p", "--read-option", "mlx_alpha=apply")
    assert r.exit_code == 2 and "valid: strict" in r.stderr, r.output
    r = cli("convert", PLAIN, "--to", "kohya", "--out", out, "--write-option", "bake=maybe")
    assert r.exit_code == 2 and "true or false" in r.stderr, r.output
    r = cli("convert", PLAIN, "--to", "kohya", "--out", out, "--write-option", "unet_names=ldm")
    assert r.exit_code == 2 and "'sgm'" in r.stderr, r.output
    assert not any(tmp_path.iterdir())


def test_cli_read_option_typed_and_applied(tmp_path):
    r = cli("convert", ALPHA_ERA, "--to", "peft", "--out", tmp_path / "a", "--base", LLAMA,
            "--read-option", "mlx_alpha=apply", "--json")
    assert r.exit_code == 0, r.output
    direct = loraport.convert(ALPHA_ERA, "peft", tmp_path / "b", base=LLAMA, read_options={"mlx_alpha": "apply"})
    ta = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    tb = (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert direct.report["max_abs_diff"] == 0.0 and ta == tb


# --- every format list is the registry's ------------------------------------------------------------------
def test_cli_choices_are_the_registry(tmp_path):
    from loraport.cli import main
    from loraport.commands.extract import extract_cmd

    assert convert_targets() == [n for n, f in formats().items() if f.writable] + \
        [n for n in export_targets() if not (n in formats() and formats()[n].writable)]
    help_text = " ".join(cli("convert", "--help").output.split())  # help points to the registry's own listing
    assert "`loraport formats` lists them" in help_text  # (listing here would import every format and torch)
    listing = cli("formats").output
    assert all(f"`{n}`" in listing for n, f in formats().items() if f.writable)
    for t in convert_targets():  # each is accepted as a target (a missing adapter is what stops it)
        r = cli("convert", "--to", t, "--out", tmp_path / "x")
        assert "unknown --to" not in r.output, (t, r.output)
    r = cli("convert", PLAIN, "--to", "onnx-adapterz", "--out", tmp_path / "x")
    assert r.exit_code == 2 and ", ".join(sorted(convert_targets())) in r.stderr
    to = next(p for p in extract_cmd.params if p.name == "to")
    assert list(to.type.choices) == [n for n, f in formats().items() if f.extract_to]
    assert set(to.type.choices) <= {n for n, f in formats().items() if f.writable}
    assert main.get_command(None, "extract") is not None


def test_formats_json_lists_each_formats_options():
    import json

    r = cli("formats", "--json")
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)
    assert list(listed) == list(formats())
    for name, f in formats().items():
        assert listed[name]["read_options"] == [x.name for x in dataclasses.fields(f.read_options)]
        want = [x.name for x in dataclasses.fields(f.write_options)] if f.writable else None
        assert listed[name]["write_options"] == want, name
    assert "mlx_alpha" in listed["mlx"]["read_options"] and "bake" in listed["kohya"]["write_options"]


def test_no_module_outside_the_registry_lists_format_names():
    """No literal tuple / list / set of two or more format names anywhere in loraport/ but formats/."""
    names = set(formats()) | set(export_targets())
    pkg = Path(loraport.__file__).parent
    found = []
    for py in pkg.rglob("*.py"):
        if py.parent.name == "formats" and py.parent.parent == pkg:
            continue
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                    isinstance(e, ast.Constant) and e.value in names for e in node.elts):
                found.append(f"{py.relative_to(pkg)}:{node.lineno}")
    assert not found, found


def test_inexpressible_is_public():
    from loraport.formats import _llm

    assert issubclass(Inexpressible, BadInputError)
    assert _llm.Inexpressible is Inexpressible  # the helpers raise the public class
