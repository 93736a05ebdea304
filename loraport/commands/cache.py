"""`loraport cache info|clear`: what loraport remembers between runs, and forgetting it.

Two things live in the cache folder (loraport.manifest.cache_root(): $LORAPORT_CACHE_DIR, else
$XDG_CACHE_HOME/loraport, else ~/.cache/loraport): the inputs' sha256 (`sha256-cache.json`, loraport.manifest)
and captured ONNX graphs (`graphs/`, loraport.onnx.graph_cache). `clear` removes only those, never anything
else a user keeps in a folder they pointed LORAPORT_CACHE_DIR at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from loraport.console import emit_json, err


def register(group: click.Group) -> None:
    group.add_command(cache_group)


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def cache_info() -> dict:
    from loraport.manifest import CACHE_FILE, _read_cache, cache_root

    root = cache_root()
    hashes = root / CACHE_FILE
    graphs = root / "graphs"
    entries = [p for p in graphs.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")] if graphs.is_dir() else []
    return {"root": str(root), "hash_entries": len(_read_cache(hashes)), "hash_bytes": _size(hashes),
            "graphs": len(entries), "graph_bytes": _size(graphs)}


def cache_clear(hashes: bool = True, graphs: bool = True) -> dict:
    from loraport.manifest import CACHE_FILE, cache_root

    root = cache_root()
    before = cache_info()
    if hashes:
        (root / CACHE_FILE).unlink(missing_ok=True)
    if graphs and (root / "graphs").is_dir():
        shutil.rmtree(root / "graphs")
    return {"root": str(root), "removed_hash_entries": before["hash_entries"] if hashes else 0,
            "removed_graphs": before["graphs"] if graphs else 0,
            "freed_bytes": (before["hash_bytes"] if hashes else 0) + (before["graph_bytes"] if graphs else 0)}


@click.group("cache")
def cache_group():
    """What loraport remembers between runs: input sha256 digests and captured ONNX graphs."""


@cache_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable report on stdout")
def info_cmd(as_json):
    """Where the cache is and what it holds."""
    rep = cache_info()
    if as_json:
        emit_json(rep)
        return
    from rich.markup import escape

    err.print(f"{escape(rep['root'])}: {rep['hash_entries']} remembered input sha256 ({rep['hash_bytes']} bytes), "
              f"{rep['graphs']} ONNX graph(s) ({rep['graph_bytes']} bytes)", markup=True)


@cache_group.command("clear")
@click.option("--hashes", "only_hashes", is_flag=True, help="only the remembered input sha256 digests")
@click.option("--graphs", "only_graphs", is_flag=True, help="only the captured ONNX graphs")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable report on stdout")
def clear_cmd(only_hashes, only_graphs, as_json):
    """Forget what the cache holds (both kinds unless --hashes or --graphs). The next merge hashes its inputs
    again and the next ONNX export traces its graph again; nothing else changes."""
    both = not (only_hashes or only_graphs)
    rep = cache_clear(hashes=both or only_hashes, graphs=both or only_graphs)
    if as_json:
        emit_json(rep)
        return
    from rich.markup import escape

    err.print(f"removed {rep['removed_hash_entries']} input sha256 and {rep['removed_graphs']} ONNX graph(s) from "
              f"{escape(rep['root'])} ({rep['freed_bytes']} bytes)", markup=True)
