"""The README is the front door: its support matrix must be the registry's, its specs must exist, and the
commands it documents must exist with the flags it shows."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from loraport.cli import main
from loraport.formats import formats, support_matrix

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_support_matrix_matches_registry():
    block = re.search(r"<!-- support-matrix:start -->\n(.*?)\n<!-- support-matrix:end -->", README, re.S)
    assert block, "README lacks the support-matrix markers"
    assert block.group(1).strip() == support_matrix().strip(), (
        "README support matrix is out of date: paste the output of `loraport formats`"
    )


def test_every_format_has_a_spec():
    for name, f in formats().items():
        assert (ROOT / "formats" / f"{f.spec or name}.md").is_file(), f"format {name} has no spec"


def test_readme_commands_exist_with_their_flags():
    """Every `loraport <cmd> ... --flag` line in a README code block names a real command and real flags."""
    runner = CliRunner()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README, re.S)
    lines = [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    checked = 0
    for ln in lines:
        m = re.match(r"loraport (\w[\w-]*)(.*)", ln)
        if not m:
            continue
        cmd, rest = m.group(1), m.group(2)
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0, f"README mentions `loraport {cmd}`, which does not exist"
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest.split("#")[0]):
            assert flag in res.output, f"README shows `loraport {cmd} {flag}`, which the command does not accept"
        checked += 1
    assert checked >= 5, "expected the README recipes to show loraport commands"
