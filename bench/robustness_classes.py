"""The hostile-input classes of issue 14 as rows of the robustness report: each class builds its hostile inputs
with tests/_hostile_classes.py (the builders the regression tests use) and runs every one on a worker thread
(where no signal can interrupt it) under a time limit and the capped address space of the fuzzers.

A trial ends as one of: a refusal (a one-line LoraportError, a CLI exit 2 with one stderr line, or a forged cache
entry ignored), a valid result, a hang (still running at its limit: its thread is abandoned, the process exits
at the end) or lost (anything else: another exception, a multi-line message, an expected refusal accepted, or
a check after it failed: a secret's bytes in an output, the folder's code ran, an output written on refusal).
Run by bench/robustness_report.py, one class per child process (its stdin a stream of "y" lines).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import _hostile_classes as HC  # noqa: E402
import _hostile_util as H  # noqa: E402
import robustness_layouts as RL  # noqa: E402

REFUSED = "refused"  # a trial's result when a forged cache entry was ignored (no error to raise)


@dataclass
class Trial:
    name: str
    run: Callable[[], object]  # raises a LoraportError, or returns a result (REFUSED, a CLI outcome, anything)
    expect: str = "error"  # "error" | "ok" | "any"
    say: str = ""  # text the refusal must hold
    check: Callable[[], str | None] | None = None  # after the trial: what went wrong, or None
    limit: float = 60.0


def _outcome(r) -> tuple[str, str]:
    """("error" | "ok" | "lost", message) for what a trial returned."""
    if r == REFUSED:
        return "error", "ignored"
    code = getattr(r, "exit_code", getattr(r, "returncode", None))
    if code is None:
        return "ok", ""
    err = r.stderr if isinstance(r.stderr, str) else ""
    lines = [x for x in err.splitlines() if x.strip()]
    if code == 0:
        return "ok", ""
    if code == 2 and len(lines) == 1 and "Traceback" not in err:
        return "error", lines[0]
    return "lost", f"exit {code}: {err[-300:]!r}"


def run_trials(trials: list[Trial]) -> dict:
    c = {"tried": 0, "clean errors": 0, "valid": 0, "internal errors": 0, "hangs": 0, "lost": 0, "max_s": 0.0}
    for t in trials:
        box: dict = {}

        def body(t=t, box=box):
            try:
                box["r"] = t.run()
            except BaseException as e:  # noqa: BLE001 - classified below
                box["e"] = e

        c["tried"] += 1
        t0 = time.perf_counter()
        with H.memory_cap():
            th = threading.Thread(target=body, daemon=True)
            th.start()
            th.join(t.limit)
        dt = time.perf_counter() - t0
        c["max_s"] = max(c["max_s"], dt)
        if dt > 2:
            print(f"  slow: {t.name}: {dt:.1f} s", file=sys.stderr)
        if th.is_alive():
            c["hangs"] += 1
            c["lost"] += 1
            print(f"  HANG {t.name}: still running after {t.limit:g} s", file=sys.stderr)
            continue
        kind, msg = _classify(box)
        c[{"error": "clean errors", "ok": "valid", "lost": "internal errors"}[kind]] += 1
        problem = _problem(t, kind, msg)
        if problem:
            c["lost"] += 1
            print(f"  LOST {t.name}: {problem}", file=sys.stderr)
    return c


def _classify(box: dict) -> tuple[str, str]:
    from loraport.errors import LoraportError

    e = box.get("e")
    if e is None:
        return _outcome(box.get("r"))
    if isinstance(e, LoraportError) and H.clean_message(e):
        return "error", str(e)
    return "lost", f"{type(e).__name__}: {str(e)[:300]}"


def _problem(t: Trial, kind: str, msg: str) -> str | None:
    if kind == "lost":
        return msg
    if kind == "error" and t.expect == "ok":
        return f"refused a valid input: {msg[:300]}"
    if kind == "ok" and t.expect == "error":
        return "accepted a hostile input"
    if kind == "error" and t.say and t.say not in msg:
        return f"refusal does not name {t.say!r}: {msg[:300]}"
    return t.check() if t.check is not None else None


# ------------------------------------------------------------------------------------------------ helpers
def _merge(base, adapters, out, **kw):
    from loraport.merging import merge

    return merge(base, [(a, 1.0) for a in adapters], out, hash_cache=False, **kw)


def _absent(*paths: Path) -> Callable[[], str | None]:
    return lambda: next((f"{p} was written" for p in paths if p.exists()), None)


def _no_leak(root: Path, *absent: Path) -> Callable[[], str | None]:
    def check():
        leaked = HC.secret_leaked(root)
        return f"secret's bytes in {leaked[0]}" if leaked else _absent(*absent)()
    return check


def _copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return dst


def _cli_inproc(*args) -> object:
    from click.testing import CliRunner

    from loraport.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ path policy
def path_symlink_out(tmp: Path) -> list[Trial]:
    from loraport.onnx.baking import bake
    from loraport.parity import detect_artifact

    base, ad, outs = tmp / "base", tmp / "ad", tmp / "outs"
    secret = HC.secret(tmp)
    outs.mkdir()
    trials = []
    for i, name in enumerate(("tokenizer.json", "config.json", "generation_config.json")):
        b = _copy(HC.PEFT_LLAMA, tmp / f"base{i}")
        HC.plant(b / name, secret)
        trials.append(Trial(f"base {name} -> secret", lambda b=b, i=i: _merge(b, [HC.PEFT_PLAIN], outs / f"m{i}"),
                            say="refused", check=_no_leak(tmp, outs / f"m{i}")))
    for i, name in enumerate(("README.md", "adapter_config.json", "adapter_model.safetensors")):
        a = _copy(HC.PEFT_PLAIN, tmp / f"ad{i}")
        HC.plant(a / name, secret)
        trials.append(Trial(f"adapter {name} -> secret", lambda a=a, i=i: _merge(HC.PEFT_LLAMA, [a], outs / f"a{i}"),
                            say="refused", check=_no_leak(tmp, outs / f"a{i}")))
    link_dir = _copy(HC.PEFT_LLAMA, base)
    (link_dir / "linked").symlink_to(secret.parent, target_is_directory=True)
    trials.append(Trial("base folder symlink out", lambda: _merge(base, [HC.PEFT_PLAIN], outs / "d"), expect="any",
                        check=_no_leak(tmp)))
    inside = _copy(HC.PEFT_PLAIN, ad)
    (inside / "sub").mkdir()
    (inside / "sub" / "notes.md").write_text("notes")
    HC.plant(inside / "README.md", "sub/notes.md")
    trials.append(Trial("symlink inside the folder (control)", lambda: _merge(HC.PEFT_LLAMA, [ad], outs / "in"),
                        expect="ok"))
    onnx_ok = HC.onnx_llama_base(tmp / "onnx-ok")
    trials.append(Trial("ONNX external data, plain file (control)",
                        lambda: _merge(onnx_ok, [HC.PEFT_PLAIN], outs / "ok.onnx"), expect="ok"))
    bad = HC.onnx_llama_base(tmp / "onnx-bad")
    data = bad.parent / "weights.bin"
    same = HC.secret(tmp / "same-size", data.stat().st_size)
    HC.plant(data, same)
    trials.append(Trial("ONNX external data -> secret (bake)", lambda: _merge(bad, [HC.PEFT_PLAIN], outs / "b.onnx"),
                        say="refused", check=_no_leak(tmp, outs / "b.onnx")))
    trials.append(Trial("ONNX external data -> secret (validate)", lambda: detect_artifact(bad), say="refused"))
    trials.append(Trial("ONNX external data -> secret (bake API)",
                        lambda: bake(str(bad), [(str(HC.PEFT_PLAIN), 1.0)], str(outs / "c.onnx")), say="refused",
                        check=_no_leak(tmp, outs / "c.onnx")))
    return trials


def path_pseudo_files(tmp: Path) -> list[Trial]:
    from loraport.manifest import sha256_file

    outs = tmp / "outs"
    outs.mkdir()
    trials = []
    targets = ["/proc/self/pagemap", "/proc/self/environ", "/proc/self/mem", "/dev/zero", "/dev/urandom"]
    targets += [p for p in ("/sys/kernel/mm/transparent_hugepage/enabled",) if os.path.exists(p)]
    for i, tgt in enumerate(targets):
        b = _copy(HC.PEFT_LLAMA, tmp / f"b{i}")
        (b / "extra.json").symlink_to(tgt)
        trials.append(Trial(f"base side file -> {tgt}", lambda b=b, i=i: _merge(b, [HC.PEFT_PLAIN], outs / f"b{i}"),
                            say="refused", check=_absent(outs / f"b{i}")))
        a = _copy(HC.PEFT_PLAIN, tmp / f"a{i}")
        HC.plant(a / "adapter_config.json", tgt)
        trials.append(Trial(f"adapter_config.json -> {tgt}",
                            lambda a=a, i=i: _merge(HC.PEFT_LLAMA, [a], outs / f"a{i}"), say="refused",
                            check=_absent(outs / f"a{i}")))
        named = tmp / f"named{i}.safetensors"
        named.symlink_to(tgt)
        trials.append(Trial(f"named adapter -> {tgt}", lambda n=named, i=i: _merge(HC.PEFT_LLAMA, [n], outs / f"n{i}"),
                            say="refused", check=_absent(outs / f"n{i}")))
        trials.append(Trial(f"manifest hash of a link -> {tgt}", lambda n=named: sha256_file(n), say="refused"))
    return trials


def path_fifos(tmp: Path) -> list[Trial]:
    from loraport.manifest import input_hashes, sha256_file

    outs = tmp / "outs"
    outs.mkdir()
    stray = _copy(HC.PEFT_LLAMA, tmp / "b-stray")
    os.mkfifo(stray / "notes.fifo")
    weights = _copy(HC.PEFT_LLAMA, tmp / "b-weights")
    (weights / "model.safetensors").unlink()
    os.mkfifo(weights / "model.safetensors")
    side = _copy(HC.PEFT_LLAMA, tmp / "b-side")
    (side / "tokenizer.json").unlink()
    os.mkfifo(side / "tokenizer.json")
    a_stray = _copy(HC.PEFT_PLAIN, tmp / "a-stray")
    os.mkfifo(a_stray / "notes")
    a_cfg = _copy(HC.PEFT_PLAIN, tmp / "a-cfg")
    (a_cfg / "adapter_config.json").unlink()
    os.mkfifo(a_cfg / "adapter_config.json")
    named = tmp / "lora.safetensors"
    os.mkfifo(named)
    linked = tmp / "link.safetensors"
    linked.symlink_to(named)
    return [
        Trial("base with a stray FIFO", lambda: _merge(stray, [HC.PEFT_PLAIN], outs / "s"), expect="ok",
              check=_absent(outs / "s" / "notes.fifo")),
        Trial("base weights are a FIFO", lambda: _merge(weights, [HC.PEFT_PLAIN], outs / "w"), say="FIFO",
              check=_absent(outs / "w")),
        Trial("base tokenizer.json is a FIFO", lambda: _merge(side, [HC.PEFT_PLAIN], outs / "t"), expect="any",
              check=_absent(outs / "t" / "tokenizer.json")),
        Trial("adapter with a stray FIFO", lambda: _merge(HC.PEFT_LLAMA, [a_stray], outs / "as"), expect="ok"),
        Trial("adapter_config.json is a FIFO", lambda: _merge(HC.PEFT_LLAMA, [a_cfg], outs / "ac"),
              check=_absent(outs / "ac")),
        Trial("named adapter is a FIFO", lambda: _merge(HC.PEFT_LLAMA, [named], outs / "n"), say="FIFO"),
        Trial("named adapter links to a FIFO", lambda: _merge(HC.PEFT_LLAMA, [linked], outs / "l"), say="FIFO"),
        Trial("manifest hash of a FIFO", lambda: sha256_file(named), say="FIFO"),
        Trial("manifest hash of a folder with a FIFO", lambda: input_hashes([stray]), expect="ok"),
    ]


def path_hf_snapshot(tmp: Path) -> list[Trial]:
    outs = tmp / "outs"
    outs.mkdir()
    cache = tmp / "hub"
    good = HC.hf_cache(HC.PEFT_LLAMA, cache, "org/good")
    other = HC.hf_cache(HC.PEFT_LLAMA, cache, "org/other")
    secret = HC.secret(tmp)
    trials = [Trial("genuine snapshot (control)", lambda: _merge(good, [HC.PEFT_PLAIN], outs / "g"), expect="ok",
                    check=lambda: None if all((outs / "g" / n).is_file() and not (outs / "g" / n).is_symlink()
                                              for n in ("config.json", "tokenizer.json", "generation_config.json"))
                    else "side files lost from a snapshot base")]
    for i, name in enumerate(("tokenizer.json", "config.json", "model.safetensors")):
        snap = HC.hf_cache(HC.PEFT_LLAMA, tmp / f"hub{i}", "org/tiny")
        tgt = (other / name).resolve()
        HC.plant(snap / name, os.path.relpath(tgt, snap))
        trials.append(Trial(f"{name} -> another repo's blobs/", lambda s=snap, i=i: _merge(s, [HC.PEFT_PLAIN],
                                                                                           outs / f"o{i}"),
                            say="blobs/", check=_absent(outs / f"o{i}")))
        snap2 = HC.hf_cache(HC.PEFT_LLAMA, tmp / f"hubs{i}", "org/tiny")
        HC.plant(snap2 / name, secret)
        trials.append(Trial(f"{name} -> secret", lambda s=snap2, i=i: _merge(s, [HC.PEFT_PLAIN], outs / f"s{i}"),
                            say="refused", check=_no_leak(tmp, outs / f"s{i}")))
    snap3 = HC.hf_cache(HC.PEFT_LLAMA, tmp / "hubb", "org/tiny")
    blob = (snap3 / "tokenizer.json").resolve()
    HC.plant(blob, secret)  # the blob itself leaves the store
    trials.append(Trial("blob -> secret", lambda: _merge(snap3, [HC.PEFT_PLAIN], outs / "bl"), say="refused",
                        check=_no_leak(tmp, outs / "bl")))
    return trials


# ------------------------------------------------------------------------------------------------ remote code
def remote_code(tmp: Path) -> list[Trial]:
    """This process's stdin is a stream of "y" lines (the report pipes it): what a prompt would read."""
    from loraport.onnx.export import export_onnx
    from loraport.parity import load_torch_model

    folder, marker = HC.evil_folder(tmp)
    known = _copy(folder, tmp / "evil_llama_type")
    cfg = json.loads((known / "config.json").read_text())
    cfg["model_type"] = "llama"  # a type transformers knows, still pointing at the folder's code
    (known / "config.json").write_text(json.dumps(cfg))

    def ran() -> str | None:
        return "the folder's code ran" if marker.exists() else None

    def validate_cli(f: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-m", "loraport", "validate", str(f), "--base", str(f), "--adapter",
                               str(HC.LLM_LORA)], input="y\n" * 50, capture_output=True, text=True, env=env,
                              cwd=str(ROOT), timeout=120)

    return [
        Trial("validate CLI, 'y' piped", lambda: validate_cli(folder), say="auto_map", check=ran),
        Trial("validate CLI, known model_type, 'y' piped", lambda: validate_cli(known), say="auto_map", check=ran),
        Trial("validate API (load_torch_model)", lambda: load_torch_model(folder), say="auto_map", check=ran),
        Trial("export_onnx", lambda: export_onnx(folder, [(str(HC.LLM_LORA), 1.0)], tmp / "o1"), say="auto_map",
              check=lambda: ran() or _absent(tmp / "o1")()),
        Trial("export_onnx, known model_type", lambda: export_onnx(known, [(str(HC.LLM_LORA), 1.0)], tmp / "o2"),
              say="auto_map", check=lambda: ran() or _absent(tmp / "o2")()),
        Trial("merge (reads weights only)", lambda: _merge(folder, [HC.LLM_LORA], tmp / "o3"), expect="any",
              check=ran),
    ]


# ------------------------------------------------------------------------------------------------ pattern bombs
def pattern_bombs(tmp: Path) -> list[Trial]:
    import re

    from loraport.formats import load_adapter

    trials = []
    for i, key in enumerate(H.BAD_PATTERNS):
        for field in ("rank_pattern", "alpha_pattern"):
            p = HC.peft_adapter(tmp / f"peft{i}{field}", 2, cfg_extra={field: {key: 2}}, leaf=HC.RUN)
            trials.append(Trial(f"PEFT {field} {key[:20]!r}", lambda p=p: load_adapter(p, format="peft"),
                                expect="any" if key == "q_proj" else "error", limit=20))
        d = HC.diffusers_file(tmp / f"diff{i}.safetensors", 2,
                              {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {key: 3}}, leaf=HC.RUN)
        trials.append(Trial(f"diffusers alpha_pattern {key[:20]!r}", lambda d=d: load_adapter(d, format="diffusers"),
                            expect="any" if key == "q_proj" else "error", limit=20))
    many = {rf"layers\.{i}\d*\.mlp\.y_proj": 3 for i in range(10_000)}
    p = HC.peft_adapter(tmp / "many", 1000, cfg_extra={"alpha_pattern": many})
    trials.append(Trial("PEFT 10k costly keys x 1000 modules", lambda: load_adapter(p, format="peft"),
                        say="took over", limit=30))
    lit = {re.escape(f"model.layers.{i}.mlp.x_proj"): 1 + i % 5 for i in range(10_000)}
    q = HC.peft_adapter(tmp / "lit", 1000, cfg_extra={"alpha_pattern": lit})
    trials.append(Trial("PEFT 10k literal keys x 1000 modules (control)", lambda: load_adapter(q, format="peft"),
                        expect="ok", limit=30))
    over = HC.peft_adapter(tmp / "over", 2, cfg_extra={"rank_pattern": {f"m{i}": 2 for i in range(70_000)}})
    trials.append(Trial("PEFT 70k keys", lambda: load_adapter(over, format="peft"), say="keys", limit=30))
    dm = {rf"blocks\.{i}\d*\.attn\.to_k": 3 for i in range(10_000)}
    d = HC.diffusers_file(tmp / "many.safetensors", 1000, {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": dm})
    trials.append(Trial("diffusers 10k costly keys x 1000 modules", lambda: load_adapter(d, format="diffusers"),
                        say="took over", limit=30))
    bomb = HC.with_config(HC.LLM_LORA, tmp / "bomb", alpha_pattern={"(q+)+_proj": 2})
    trials.append(Trial("two-adapter merge, one bombed", lambda: _merge(HC.LLM_LLAMA, [HC.LLM_LORA, bomb],
                                                                        tmp / "out"),
                        say="alpha_pattern", check=_absent(tmp / "out"), limit=60))
    return trials


# ------------------------------------------------------------------------------------------------ caps
def caps_gguf(tmp: Path) -> list[Trial]:
    from loraport.formats import load_adapter
    from loraport.formats.gguf import GGUFFile

    ok = HC.gguf_adapter_with_array(tmp / "ok.gguf", 16 << 20)
    big = HC.gguf_adapter_with_array(tmp / "big.gguf", 1 << 30)
    short = tmp / "short.gguf"
    with open(big, "rb") as f:
        short.write_bytes(f.read(4096))
    lie = bytearray(short.read_bytes())
    at = lie.index(b"x.bomb") + 6 + 4 + 4  # the array's count, after its key, type and item type
    lie[at:at + 8] = (2**60).to_bytes(8, "little")
    (tmp / "lie.gguf").write_bytes(bytes(lie))

    def open_close(p):
        f = GGUFFile(p)
        f.close()

    return [
        Trial("16 Mi-item uint8 array (stays a numpy array)", lambda: open_close(ok), expect="ok"),
        Trial("1 Gi-item uint8 array", lambda: load_adapter(big, format="gguf"), say="metadata arrays"),
        Trial("array longer than the file", lambda: load_adapter(short, format="gguf")),
        Trial("array count 2^60", lambda: load_adapter(tmp / "lie.gguf", format="gguf")),
    ]


def caps_safetensors(tmp: Path) -> list[Trial]:
    from loraport.formats import load_adapter
    from loraport.safetensors_io import MAX_ENTRIES, SafetensorsFile

    at_cap = HC.safetensors_many_entries(tmp / "cap.safetensors", MAX_ENTRIES)
    over = HC.safetensors_many_entries(tmp / "over.safetensors", MAX_ENTRIES + 1)
    huge = HC.safetensors_many_entries(tmp / "huge.safetensors", 900_000)
    return [
        Trial(f"{MAX_ENTRIES} entries (at the cap)", lambda: SafetensorsFile(at_cap).close(), expect="ok"),
        Trial(f"{MAX_ENTRIES + 1} entries", lambda: SafetensorsFile(over), say="tensors"),
        Trial("900k entries (86 MB header)", lambda: SafetensorsFile(huge), say="tensors"),
        Trial("900k entries read as a LoRA", lambda: load_adapter(huge, format="kohya")),
    ]


def caps_json(tmp: Path) -> list[Trial]:
    from loraport.checkpoint import Checkpoint
    from loraport.formats import load_adapter
    from loraport.jsonfile import MAX_JSON

    ad = HC.pad_json(_copy(HC.LLM_LORA, tmp / "ad") / "adapter_config.json", MAX_JSON + 11).parent
    base = HC.pad_json(_copy(HC.LLM_LLAMA, tmp / "base") / "config.json", MAX_JSON + 10, keep_head=False).parent
    deep = _copy(HC.LLM_LORA, tmp / "deep")
    (deep / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    deep_obj = _copy(HC.LLM_LORA, tmp / "deep-obj")
    cfg = json.loads((deep_obj / "adapter_config.json").read_text())
    (deep_obj / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "x": ' + '{"a":' * 100_000 + "1"
                                                  + "}" * 100_000 + "}")
    long = _copy(HC.LLM_LORA, tmp / "long")
    cfg["base_model_name_or_path"] = "x" * (MAX_JSON - 4096)
    (long / "adapter_config.json").write_text(json.dumps(cfg))
    base_deep = _copy(HC.LLM_LLAMA, tmp / "base-deep")
    (base_deep / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    return [
        Trial("adapter_config.json past the cap", lambda: load_adapter(ad, format="peft"), say="bytes of JSON"),
        Trial("base config.json past the cap", lambda: Checkpoint.open(base), say="bytes of JSON"),
        Trial("adapter_config.json nested 200k deep", lambda: load_adapter(deep, format="peft")),
        Trial("adapter_config.json with an object nested 100k deep", lambda: load_adapter(deep_obj, format="peft"),
              expect="any"),
        Trial("base config.json nested 200k deep", lambda: Checkpoint.open(base_deep)),
        Trial("adapter_config.json just under the cap", lambda: load_adapter(long, format="peft"), expect="any"),
    ]


def caps_config(tmp: Path) -> list[Trial]:
    from loraport.onnx.export import export_onnx
    from loraport.parity import load_torch_model

    trials = []
    for i, (field, value, say) in enumerate(HC.HOSTILE_CONFIGS):
        b = HC.with_config(HC.LLM_LLAMA, tmp / f"b{i}", **{field: value})
        trials.append(Trial(f"export_onnx, {field}={str(value)[:12]}",
                            lambda b=b, i=i: export_onnx(b, [], tmp / f"o{i}"), say=say,
                            check=_absent(tmp / f"o{i}"), limit=30))
    h = HC.with_config(HC.LLM_LLAMA, tmp / "bh", head_dim=2**33)
    trials.append(Trial("validate, head_dim=2^33", lambda: load_torch_model(h), say="head_dim", limit=30))
    v = HC.with_config(HC.LLM_LLAMA, tmp / "bv", vocab_size=2**40)
    trials.append(Trial("export_onnx, vocab_size=2^40", lambda: export_onnx(v, [], tmp / "ov"), expect="error",
                        check=_absent(tmp / "ov"), limit=30))
    return trials


# ------------------------------------------------------------------------------------------------ cache
def cache_graphs(tmp: Path) -> list[Trial]:
    from loraport.onnx import graph_cache

    root = Path(os.environ["LORAPORT_CACHE_DIR"])

    def forged(key_of_attacker: bytes | None, k: str):
        def run():
            assert graph_cache.store(k, HC.tiny_capture("genuine"))
            HC.forge_meta(root / "graphs" / k, key_of_attacker)
            if graph_cache.load(k) is not None:
                return "used"  # counted as a valid result: expected a refusal, so lost
            assert graph_cache.store(k, HC.tiny_capture("genuine"))  # rebuilt over it
            return REFUSED if graph_cache.load(k).proto.graph.node[0].name == "genuine" else "used"
        return run

    def users_files():
        graphs = root / "graphs"
        graphs.mkdir(parents=True, exist_ok=True)
        (graphs / "plot.png").write_bytes(b"the user's")
        (graphs / ("cd" * 32)).mkdir(exist_ok=True)
        (graphs / ("cd" * 32) / "thesis.tex").write_text("theirs")
        return _cli_inproc("cache", "clear")

    def kept():
        g = root / "graphs"
        ok = (g / "plot.png").read_bytes() == b"the user's" and (g / ("cd" * 32) / "thesis.tex").is_file()
        return None if ok else "cache clear removed a user's file"

    return [
        Trial("graph entry swapped, meta unsigned", forged(None, "12" * 32)),
        Trial("graph entry swapped, meta signed with another key", forged(os.urandom(32), "34" * 32)),
        Trial("user's files under graphs/, cache clear", users_files, expect="ok", check=kept),
        Trial("store over a user's folder at an entry path",
              lambda: REFUSED if not graph_cache.store("cd" * 32, HC.tiny_capture("x")) else "replaced", check=kept),
    ]


def cache_hashes(tmp: Path) -> list[Trial]:
    import hashlib

    from bench.common import build_adapter, build_base
    from loraport import manifest as mf
    from loraport.merging import merge

    mf.RACY_SECONDS = 0.0  # the files were written a moment ago
    build_base(tmp / "base", "tiny", seed=5)
    build_adapter(tmp / "ad", "tiny", rank=4, seed=6)
    cache_file = Path(os.environ["LORAPORT_CACHE_DIR"]) / mf.CACHE_FILE
    shard = next((tmp / "base").glob("*.safetensors"))
    true = hashlib.sha256(shard.read_bytes()).hexdigest()

    def forged(key: bytes | None, n: int):
        def run():
            merge(tmp / "base", [tmp / "ad"], tmp / f"o{n}a")
            HC.forge_hash_entry(cache_file, os.path.realpath(shard), key)
            merge(tmp / "base", [tmp / "ad"], tmp / f"o{n}b")
            got = json.loads((tmp / f"o{n}b" / mf.FOLDER_MANIFEST).read_text())["inputs"][str(shard)]
            return REFUSED if got == true else "forged sha256 recorded"
        return run

    return [Trial("hash entry forged, unsigned", forged(None, 1)),
            Trial("hash entry forged, signed with another key", forged(os.urandom(32), 2))]


# ------------------------------------------------------------------------------------------------ batch
def batch_collisions(tmp: Path) -> list[Trial]:
    from loraport.batch import jobs_from_file

    d = tmp / "adapters"
    HC.colliding_batch(d)
    old = tmp / "old-outs"
    (old / "tuned").mkdir(parents=True)
    (old / "tuned" / "model.safetensors").write_bytes(b"a previous result")
    d2 = tmp / "adapters2"
    HC.colliding_batch(d2, "a")
    shutil.copy(d2 / "a.gguf", d2 / "a.safetensors")  # three ways to one name
    (d2 / "a.gguf").unlink()
    shutil.copy(HC.ROOT / "fixtures" / "llm" / "gguf" / "llama_lora.gguf", d2 / "a.gguf")
    jf = tmp / "jobs.json"
    jf.write_text(json.dumps([{"adapter": "a1", "out": "outs/x"}, {"adapter": "b2", "out": "outs/../outs/x"}]))
    ok_dir = tmp / "distinct"
    ok_dir.mkdir()
    shutil.copy(HC.ROOT / "fixtures" / "llm" / "gguf" / "llama_lora.gguf", ok_dir / "one.gguf")
    shutil.copytree(HC.ROOT / "fixtures" / "llm" / "mlx" / "llama_lora", ok_dir / "two")

    def unchanged():
        return None if (old / "tuned" / "model.safetensors").read_bytes() == b"a previous result" and \
            [p.name for p in old.iterdir()] == ["tuned"] else "an existing result was changed"

    base = HC.LLM_LLAMA
    return [
        Trial("x.gguf + x/ into a new folder, --overwrite",
              lambda: _cli_inproc("merge", "--base", base, "--adapter-dir", d, "--out", tmp / "new", "--overwrite"),
              say="tuned", check=_absent(tmp / "new")),
        Trial("x.gguf + x/ over previous results, --overwrite",
              lambda: _cli_inproc("merge", "--base", base, "--adapter-dir", d, "--out", old, "--overwrite"),
              say="tuned", check=unchanged),
        Trial("a.gguf + a.safetensors + a/", lambda: _cli_inproc("merge", "--base", base, "--adapter-dir", d2,
                                                                 "--out", tmp / "new2"),
              check=_absent(tmp / "new2")),
        Trial("jobs file, two outs spelled differently", lambda: jobs_from_file(jf), say="would both write"),
        Trial("distinct names (control)", lambda: _cli_inproc("merge", "--base", base, "--adapter-dir", ok_dir,
                                                              "--out", tmp / "ok"), expect="ok"),
    ]


# ------------------------------------------------------------------------------------------------ ONNX fields
def onnx_fields(tmp: Path) -> list[Trial]:
    from loraport.onnx.baking import bake

    ad = HC.onnx_small_adapter(tmp / "ad")
    trials = []
    for i, (mutate, say) in enumerate(HC.ONNX_FIELD_CASES):
        d = tmp / f"m{i}"
        d.mkdir()
        p = HC.onnx_small_base(d, mutate)
        out = d / "out.onnx"
        trials.append(Trial(mutate.__name__, lambda p=p, out=out: bake(str(p), [(str(ad), 1.0)], str(out)), say=say,
                            check=_absent(out)))
    ok = tmp / "ok"
    ok.mkdir()
    p = HC.onnx_small_base(ok, lambda a, b: None)
    trials.append(Trial("undamaged (control)", lambda: bake(str(p), [(str(ad), 1.0)], str(ok / "out.onnx")),
                        expect="ok"))
    return trials


# ------------------------------------------------------------------------------------------------ rank 0
def rank_zero(tmp: Path) -> list[Trial]:
    import torch

    from loraport.formats import load_adapter
    from loraport.safetensors_io import SafetensorsFile

    r0 = HC.rank0_adapter(tmp / "r0")
    r0cfg = HC.with_config(HC.LLM_LORA, tmp / "r0cfg", r=0)

    def same_as_base(out: Path):
        def check():
            base = SafetensorsFile(HC.LLM_LLAMA / "model.safetensors")
            got = SafetensorsFile(next(out.glob("*.safetensors")))
            bad = [n for n in base.names() if not torch.equal(base.get(n), got.get(n))]
            base.close()
            got.close()
            return f"rank-0 merge changed {bad[0]}" if bad else None
        return check

    return [
        Trial("rank-0 PEFT adapter: merge is the base", lambda: _merge(HC.LLM_LLAMA, [r0], tmp / "o1"), expect="ok",
              check=same_as_base(tmp / "o1")),
        Trial("rank-0 PEFT adapter: read", lambda: load_adapter(r0, format="peft"), expect="ok"),
        Trial("rank-0 with a real adapter", lambda: _merge(HC.LLM_LLAMA, [r0, HC.LLM_LORA], tmp / "o2"),
              expect="ok"),
        Trial("config r=0, real tensors", lambda: _merge(HC.LLM_LLAMA, [r0cfg], tmp / "o3"), expect="any"),
    ]


CLASSES: dict[str, tuple[str, Callable[[Path], list[Trial]]]] = {
    "path-out": ("path policy: symlinks out of the folder", path_symlink_out),
    "path-proc": ("path policy: /proc, /sys and device links", path_pseudo_files),
    "path-fifo": ("path policy: FIFOs", path_fifos),
    "path-hf": ("path policy: HF snapshot links outside blobs/", path_hf_snapshot),
    "remote-code": ("remote code (auto_map, 'y' on stdin)", remote_code),
    "patterns": ("pattern bombs (PEFT + diffusers, worker thread)", pattern_bombs),
    "caps-gguf": ("caps: GGUF metadata arrays", caps_gguf),
    "caps-st": ("caps: safetensors header entries", caps_safetensors),
    "caps-json": ("caps: oversized / deep JSON", caps_json),
    "caps-config": ("caps: hostile config.json (ONNX export, validate)", caps_config),
    "cache-graph": ("cache authenticity: graph entries", cache_graphs),
    "cache-hash": ("cache authenticity: sha256 entries", cache_hashes),
    "batch": ("batch output-name collisions", batch_collisions),
    "onnx-fields": ("malformed ONNX fields (bake)", onnx_fields),
    "rank0": ("rank 0", rank_zero),
    **{f"layouts-{k}": (t, lambda tmp, k=k: RL.cases(k, tmp)) for k, t in (
        ("mxfp4", "hostile MXFP4 gpt-oss bases (2026-12-05)"), ("fp8", "hostile fp8 group / block / ue8m0 bases"),
        ("gguf-dit", "hostile ComfyUI-GGUF DiT bases (orig_shape, 5-D)"),
        ("family", "DiT LoRA on another family's base (Chroma / Lumina2 / HiDream)"))},
}


def run_class(name: str, tmp: Path) -> dict:
    trials = CLASSES[name][1](tmp)
    return run_trials(trials)
