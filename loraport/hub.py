"""Hugging Face repo ids as inputs: `org/name[@revision]` given where a base or adapter path is expected resolves
to that repo's snapshot in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub), through
huggingface_hub's own offline lookup. Never the network: a repo that is not cached gets one line saying how to
fetch it. A path that exists always wins over a repo id of the same spelling."""

from __future__ import annotations

import os
import re
from pathlib import Path

from loraport.errors import BadInputError

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                      r"(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".json", ".npz")


def parse_repo_id(arg: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `arg` is spelled like a Hub repo id (`org/name` or `org/name@rev`), else None."""
    m = _REPO_ID.match(arg)
    if not m or ".." in m.group("repo") or m.group("repo").lower().endswith(_FILE_SUFFIXES):
        return None
    return m.group("repo"), m.group("rev")


def cache_dir() -> str | None:
    """The hub cache as huggingface_hub itself would choose it, read now (not when huggingface_hub was
    imported), so a changed HF_HUB_CACHE / HF_HOME is honoured."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's default (~/.cache/huggingface/hub)


def resolve(arg: str | Path | None, role: str = "input") -> Path | None:
    """`arg` as a local path: itself when it exists (or is not spelled like a repo id: the caller reports it
    missing), else the cached snapshot of the Hub repo it names. `role` ("base", "adapter") is for the message."""
    if arg is None:
        return None
    p = Path(arg)
    if p.exists():
        return p
    spec = parse_repo_id(str(arg))
    if spec is None:
        return p
    repo, rev = spec
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a dependency of transformers, so normally present
        raise BadInputError(f"{role} {arg}: no such file or folder (install huggingface_hub to use Hub repo ids)") \
            from None
    try:
        found = snapshot_download(repo, revision=rev, cache_dir=cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        found = None
    if not found or not Path(found).is_dir():
        where = cache_dir() or "the default Hugging Face cache"
        get = f"hf download {repo}" + (f" --revision {rev}" if rev else "") + f" --local-dir ./{repo.split('/')[1]}"
        raise BadInputError(f"{role} {arg}: no such file or folder, and {repo}"
                            f"{'@' + rev if rev else ''} is not in {where}; fetch it with `{get}` and pass that "
                            "folder (loraport never downloads)")
    return Path(found)
