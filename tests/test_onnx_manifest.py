"""ONNX outputs carry the same integrity manifest as safetensors merges (loraport/manifest.py): a folder export
its `loraport-manifest.json`, a baked `.onnx` the sibling `<out>.manifest.json` listing the .onnx and its data
file. `loraport verify` checks them (a flipped byte is found), and `loraport validate OUT` with no --base /
--adapter rebuilds the reference from what the manifest records — for ONNX and safetensors outputs alike."""

from __future__ import annotations

import json
import shutil

import pytest

from loraport.errors import BadInputError
from tests._onnx_util import ADAPTERS, LLAMA, cli, export_kw, workdir

PLAIN, PLAIN2 = ADAPTERS / "llama_plain", ADAPTERS / "llama_plain2"


def _flip(path, at: int = 0) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0x01
    path.write_bytes(bytes(b))


def _sha(path) -> str:
    from loraport.manifest import sha256_file

    return sha256_file(path)


def test_export_folder_manifest_and_verify_detects_a_flipped_byte():
    from loraport.manifest import FOLDER_MANIFEST, verify

    src = export_kw(LLAMA, [(PLAIN, 1.0)])
    out = workdir("manifest-export") / "onnx"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)  # the shared export stays intact
    man = json.loads((out / FOLDER_MANIFEST).read_text())
    for f in ("model.onnx", "model.onnx.data", "loraport_onnx.json", "config.json", "tokenizer.json"):
        assert man["files"][f]["sha256"] == _sha(out / f), f
    assert man["inputs"][str(LLAMA / "model.safetensors")] == _sha(LLAMA / "model.safetensors")
    assert man["inputs"][str(PLAIN / "adapter_model.safetensors")] == _sha(PLAIN / "adapter_model.safetensors")
    assert man["plan"]["to"] == "onnx" and man["plan"]["adapters"][0]["weight"] == 1.0
    assert verify(out)["ok"]
    _flip(out / "model.onnx.data", at=(out / "model.onnx.data").stat().st_size // 2)
    rep = verify(out)
    assert not rep["ok"] and rep["problems"] == ["model.onnx.data: sha256 differs from the manifest"]
    r = cli("verify", str(out))
    assert r.returncode == 1 and "model.onnx.data" in r.stderr


def test_bake_manifest_verify_and_validate_from_the_manifest():
    """Baking PLAIN2 into loraport's merged export of LLAMA+PLAIN: the manifest lists both output files, and
    validate with no --base finds the reference through it (LLAMA + PLAIN + PLAIN2)."""
    from loraport.manifest import manifest_path, verify
    from loraport.onnx import bake
    from loraport.parity import validate

    base = export_kw(LLAMA, [(PLAIN, 1.0)]) / "model.onnx"
    d = workdir("manifest-bake")
    out = d / "baked.onnx"
    for p in d.iterdir():
        p.unlink()
    rep = bake(str(base), [(str(PLAIN2), 0.7)], str(out))
    mp = manifest_path(out)
    assert rep["manifest"] == str(mp) and mp.name == "baked.onnx.manifest.json"
    man = json.loads(mp.read_text())
    assert set(man["files"]) == {"baked.onnx", "baked.onnx.data"}
    assert man["inputs"][str(base)] == _sha(base) and str(base.parent / "model.onnx.data") in man["inputs"]
    assert verify(out)["ok"]
    v = validate(out, provider="cpu", seq=8)
    assert v["passed"] and v["base"] == str(LLAMA.resolve())
    assert [(a["path"], a["weight"]) for a in v["adapters"]] == [(str(PLAIN.resolve()), 1.0),
                                                                  (str(PLAIN2.resolve()), 0.7)]
    _flip(out.parent / "baked.onnx.data", at=100)
    assert verify(out)["problems"] == ["baked.onnx.data: sha256 differs from the manifest"]


def test_validate_safetensors_merge_from_its_manifest():
    from loraport.merging import merge
    from loraport.parity import validate

    out = workdir("manifest-merge") / "merged"
    merge(LLAMA, [(PLAIN, 0.5)], out, overwrite=True)
    rep = validate(out)  # base and adapter (weight 0.5) from loraport-manifest.json
    assert rep["passed"] and rep["base"] == str(LLAMA)
    assert [(a["path"], a["weight"]) for a in rep["adapters"]] == [(str(PLAIN), 0.5)]
    assert not validate(out, LLAMA, [(PLAIN, 1.0)])["passed"]  # the weight matters: the hint is really used
    mp = out / "loraport-manifest.json"
    man = json.loads(mp.read_text())
    man["plan"]["base"] = str(out.parent / "moved-away")
    mp.write_text(json.dumps(man))
    with pytest.raises(BadInputError, match="moved-away: not a model folder"):
        validate(out)
    (out / "loraport-manifest.json").unlink()
    with pytest.raises(BadInputError, match="--base is required"):
        validate(out)


def test_validate_onnx_export_without_base():
    from loraport.parity import validate

    rep = validate(export_kw(LLAMA, [(PLAIN, 1.0)]), provider="cpu", seq=8)
    assert rep["passed"] and rep["base"] == str(LLAMA.resolve())
    assert [a["path"] for a in rep["adapters"]] == [str(PLAIN.resolve())]
