"""The export's memory measures: optional packages left out of the CLI's capture, and proof that leaving them
out changes nothing in the output."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from tests._onnx_util import ADAPTERS, LLAMA, ROOT, cli, export_kw

INSTALLED = [n for n in ("scipy", "accelerate") if importlib.util.find_spec(n) is not None]


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=120)


def test_lean_imports_marks_absent_during_capture_and_restores():
    r = _py(
        "import importlib, importlib.util, sys\n"
        "from loraport.onnx.memory import lean_imports, own_process\n"
        "assert not own_process()\n"
        f"installed = {INSTALLED!r}\n"
        "with lean_imports(True) as marked:\n"
        "    assert marked == installed, marked\n"
        "    for n in marked:\n"
        "        assert importlib.util.find_spec(n) is None\n"
        "        try:\n"
        "            importlib.import_module(n)\n"
        "        except ImportError:\n"
        "            pass\n"
        "        else:\n"
        "            raise SystemExit(n + ' importable while marked absent')\n"
        "for n in installed:\n"
        "    importlib.import_module(n)\n"
        "import transformers\n"
        "with lean_imports(True) as marked:\n"  # transformers already imported: nothing is touched
        "    assert marked == [], marked\n"
        "print('ok')\n")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_lean_imports_off_for_library_callers():
    r = _py("from loraport.onnx.memory import lean_imports\n"
            "with lean_imports(False) as marked:\n"
            "    assert marked == []\n"
            "import scipy\n" if "scipy" in INSTALLED else "print()\n")
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_export_leaves_packages_out_and_writes_the_same_bytes(tmp_path):
    """The CLI process leaves scipy/accelerate out of the capture; the graph and the weights it writes must be
    byte-identical to a library export that imported everything."""
    ref = export_kw(LLAMA, [(ADAPTERS / "llama_plain", 1.0)])
    out = tmp_path / "cli"
    r = cli("convert", "--to", "onnx", "--base", str(LLAMA), "--adapter", str(ADAPTERS / "llama_plain"),
            "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["imports_left_out"] == INSTALLED
    for name in ("model.onnx", "model.onnx.data"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
