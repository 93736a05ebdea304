"""transformers builds models here from local files only, and never runs code shipped in a model folder.

A `config.json` with `auto_map` names Python files in the folder; transformers would import them (after an
interactive prompt when `trust_remote_code` is unset, which a "y" piped on stdin answers). We refuse such a
config up front, pass `trust_remote_code=False` to every transformers constructor, and give transformers an
empty stdin while it runs so that no prompt can ever read an answer."""

from __future__ import annotations

import io
import sys
from contextlib import contextmanager

from loraport.errors import UnsafeInputError

NO_REMOTE_CODE = {"trust_remote_code": False}


def refuse_remote_code(config: dict, where: str) -> None:
    """Refuse a config that asks for the folder's own modeling code."""
    if isinstance(config, dict) and ("auto_map" in config or "custom_pipelines" in config):
        raise UnsafeInputError(f"{where}: config.json maps the model to Python code in its folder (auto_map); "
                               "loraport never runs a model folder's code — use an architecture transformers ships")


@contextmanager
def no_prompt():
    """stdin is an empty stream while transformers runs: any prompt reads end-of-file, never a "y"."""
    saved = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        yield
    finally:
        sys.stdin = saved
