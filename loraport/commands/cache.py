"""`loraport cache info|clear`: what loraport remembers between runs, and forgetting it.

Two things live in the cache folder (loraport.cache_key.cache_root(): $LORAPORT_CACHE_DIR, else
$XDG_CACHE_HOME/loraport, else ~/.cache/loraport): the inputs' sha256 (`sha256-cache.json`, loraport.manifest)
and captured ONNX graphs (`graphs/<key>/`, loraport.onnx.graph_cache). Both are authenticated with the user's key
(loraport/cache_key.py). `clear` removes only what it can prove it wrote (an entry whose HMAC verifies, a
temporary of a writer that died); everything else in the folder (a user's own `graphs/` files, a forged or
foreign entry) is left alone and reported as skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from loraport.console import emit_json, err
from loraport.manifest import CACHE_FILE


def register(group: click.Group) -> None:
    group.add_command(cache_group)


def _size(p: Path) -> int:
    if p.is_symlink():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.is_dir() else 0


def _survey(secret: bytes | None) -> dict:
    """What the cache folder holds: {"hash_file": ok?, "ours": [graph entries that verify], "stale": [dead
    writers' temporaries], "other": [everything else under graphs/]} (nothing verifies without a key)."""
    from loraport.cache_key import cache_root
    from loraport.manifest import CACHE_FILE, _read_cache
    from loraport.onnx import graph_cache as gc
    from loraport.outputs import pid_alive

    root = cache_root()
    hashes = root / CACHE_FILE
    ours, stale, other = [], [], []
    graphs = root / "graphs"
    if graphs.is_dir() and not graphs.is_symlink():
        for p in sorted(graphs.iterdir()):
            pid = gc.owner_pid(p.name)
            if pid is not None and pid_alive(pid):
                continue  # a live writer's temporary: not to be touched, not worth listing
            if pid is not None and gc.stale_tmp(p):
                stale.append(p)
            elif secret is not None and pid is None and gc.verified_meta(p, secret) is not None:
                ours.append(p)
            else:
                other.append(p)
    hash_entries = _read_cache(hashes, secret) if hashes.is_file() and not hashes.is_symlink() else {}
    hash_ok = bool(hash_entries) or (secret is not None and _verifies_empty(hashes, secret))
    return {"root": root, "hashes": hashes, "hash_entries": hash_entries, "hash_ok": hash_ok, "ours": ours,
            "stale": stale, "other": other}


def _verifies_empty(path: Path, secret: bytes) -> bool:
    import json

    from loraport import cache_key
    from loraport.manifest import CACHE_SCHEMA

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return (isinstance(d, dict) and d.get("schema") == CACHE_SCHEMA and d.get("entries") == {}
            and cache_key.verify(secret, CACHE_SCHEMA, {}, d.get("mac")))


def cache_info() -> dict:
    from loraport import cache_key

    st = cache_key.status()
    s = _survey(cache_key.load() if st["key_ok"] else None)
    return {"root": str(s["root"]), "key_file": st["key_file"], "key_ok": st["key_ok"],
            "key_problem": st["key_problem"], "hash_entries": len(s["hash_entries"]),
            "hash_bytes": _size(s["hashes"]) if s["hash_ok"] else 0,
            "hash_file_unverified": s["hashes"].is_file() and not s["hash_ok"],
            "graphs": len(s["ours"]), "graph_bytes": sum(_size(p) for p in s["ours"]),
            "unverified": [str(p) for p in s["other"]]}


def cache_clear(hashes: bool = True, graphs: bool = True) -> dict:
    """Remove what loraport can prove it wrote; report everything else it left alone as `skipped`."""
    from loraport import cache_key
    from loraport.onnx import graph_cache as gc

    st = cache_key.status()  # never makes a key: with none, nothing here can be proven ours
    s = _survey(cache_key.load() if st["key_ok"] else None)
    skipped: list[str] = []
    freed = removed_hashes = removed_graphs = 0
    if hashes and s["hashes"].exists():
        if s["hash_ok"]:
            freed += _size(s["hashes"])
            removed_hashes = len(s["hash_entries"])
            s["hashes"].unlink(missing_ok=True)
        else:
            skipped.append(str(s["hashes"]))
    if graphs:
        for p in s["ours"]:
            freed += sum(_size(p / n) for n in (gc.GRAPH, gc.BUFFERS, gc.META))
            for n in (gc.GRAPH, gc.BUFFERS, gc.META):
                (p / n).unlink(missing_ok=True)
            try:
                p.rmdir()
                removed_graphs += 1
            except OSError:  # something the user put inside our entry: theirs, kept
                skipped.append(str(p))
        for p in s["stale"]:
            freed += _size(p)
            shutil.rmtree(p, ignore_errors=True)
        skipped += [str(p) for p in s["other"]]
        try:
            (s["root"] / "graphs").rmdir()  # only when nothing else is in it
        except OSError:
            pass
    return {"root": str(s["root"]), "key_file": st["key_file"], "key_ok": st["key_ok"],
            "removed_hash_entries": removed_hashes,
            "removed_graphs": removed_graphs, "freed_bytes": freed, "skipped": skipped}


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
    key = "ok" if rep["key_ok"] else rep["key_problem"]
    err.print(f"key {escape(rep['key_file'])}: {escape(key)}", markup=True)
    unverified = rep["unverified"] + ([CACHE_FILE] if rep["hash_file_unverified"] else [])
    if unverified:
        err.print(f"{len(unverified)} item(s) not verified by the key (never used, never cleared): "
                  f"{escape(', '.join(Path(u).name for u in unverified[:5]))}", markup=True)


@cache_group.command("clear")
@click.option("--hashes", "only_hashes", is_flag=True, help="only the remembered input sha256 digests")
@click.option("--graphs", "only_graphs", is_flag=True, help="only the captured ONNX graphs")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable report on stdout")
def clear_cmd(only_hashes, only_graphs, as_json):
    """Forget what the cache holds (both kinds unless --hashes or --graphs). The next merge hashes its inputs
    again and the next ONNX export traces its graph again. Only entries authenticated by your key are removed;
    anything else in the folder is left alone and listed."""
    both = not (only_hashes or only_graphs)
    rep = cache_clear(hashes=both or only_hashes, graphs=both or only_graphs)
    if as_json:
        emit_json(rep)
        return
    from rich.markup import escape

    err.print(f"removed {rep['removed_hash_entries']} input sha256 and {rep['removed_graphs']} ONNX graph(s) from "
              f"{escape(rep['root'])} ({rep['freed_bytes']} bytes)", markup=True)
    if rep["skipped"]:
        err.print(f"left {len(rep['skipped'])} item(s) loraport cannot prove it wrote: "
                  f"{escape(', '.join(rep['skipped'][:5]))}{' ...' if len(rep['skipped']) > 5 else ''}", markup=True)
