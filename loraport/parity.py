"""`loraport validate`: run an artifact loraport wrote and an independent reference on the same inputs, and
report how far apart they are.

Reference: the base model in fp32 torch (transformers, built from the base folder, never downloaded) with the
adapters applied *unmerged*: plain LoRA as forward hooks computing y += w·s·(x·Aᵀ)·Bᵀ, other delta kinds
(DoRA, LoHa, full diffs, ...) as a dense ΔW added to the module's output (y += x·ΔWᵀ), so the reference
never goes through the merge engine it is checking.

Artifacts: a merged safetensors folder (run with transformers), an ONNX folder or .onnx file from
`convert --to onnx` / `merge --base x.onnx` (run with onnxruntime on the chosen provider), a multi-LoRA ONNX
folder (each .onnx_adapter active in turn, and none active = the base), quantized ONNX graphs. A graph with
KV-cache inputs (`--with-past`) runs step by step: prompt with an empty past, then single tokens fed the
previous present (WITH_PAST_NOTE), which checks the cache path too.

Per output: max |Δ|, mean |Δ|, cosine similarity, top-1 token agreement. `tolerance="auto"` picks the bound
from the artifact's dtype / quantization (table TOLERANCES) and says which it used.

Size: the reference (adapters unmerged, as hooks) and the artifact runners are one comparison; `validate`
itself (~90 lines, on tests/c901_allowlist.txt) is the part to split.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraport.adapter import LowRank
from loraport.paths import identity
from loraport.errors import BadInputError
from loraport.remote_code import NO_REMOTE_CODE, no_prompt, refuse_remote_code
from loraport.jsonfile import read_json
from loraport.model_slots import find as find_slot

# How far an artifact may be from the fp32 unmerged reference, by what it stores. max_abs is relative to
# max(1, max|reference logit|); min_cosine over all logits. The int8/int4 rows were measured on random-init
# tiny models (the worst case: no outlier structure) by tests/test_validate_onnx.py and rounded up.
TOLERANCES: dict[str, dict] = {
    "fp32": {"max_abs": 1e-4, "min_cosine": 0.999999, "why": "fp32: 1e-4 × max(1, |ref|max)"},
    "fp16": {"max_abs": 2e-2, "min_cosine": 0.9999, "why": "fp16 weights/activations: 2e-2 × max(1, |ref|max)"},
    "bf16": {"max_abs": 6e-2, "min_cosine": 0.999, "why": "bf16 weights: 6e-2 × max(1, |ref|max)"},
    "int8": {"max_abs": 0.25, "min_cosine": 0.995,
             "why": "int8 per-channel weights: 0.25 × max(1, |ref|max), cos ≥ 0.995"},
    "int4": {"max_abs": 1.5, "min_cosine": 0.80, "why": "int4 block-32 weights: 1.5 × max(1, |ref|max), cos ≥ 0.80"},
    "nf4": {"max_abs": 1.5, "min_cosine": 0.80,
            "why": "4-bit bitsandbytes weights: 1.5 × max(1, |ref|max), cos ≥ 0.80"},
}


WITH_PAST_NOTE = ("KV-cache graph (--with-past): the sequence ran as a prompt with an empty past (past_sequence "
                  "= 0), then one token per step with each step's present.* fed back as past_key_values.*; the "
                  "logits of all steps are compared with the reference's full-sequence logits")


# ------------------------------------------------------------------------------------------ metrics
def compare(out: np.ndarray, ref: np.ndarray) -> dict:
    """Pure metrics of an output against the reference (same shape; last axis = vocabulary)."""
    if out.shape != ref.shape:
        raise BadInputError(f"artifact output shape {list(out.shape)} != reference {list(ref.shape)}")
    o = out.astype(np.float64)
    r = ref.astype(np.float64)
    d = np.abs(o - r)
    denom = np.linalg.norm(o) * np.linalg.norm(r)
    cos = float((o * r).sum() / denom) if denom > 0 else (1.0 if np.allclose(o, r) else 0.0)
    finite = bool(np.isfinite(o).all())
    return {
        "max_abs": float(d.max()) if finite else math.inf, "mean_abs": float(d.mean()) if finite else math.inf,
        "cosine": cos if finite else 0.0, "top1_agreement": float((o.argmax(-1) == r.argmax(-1)).mean()),
        "ref_max_abs": float(np.abs(r).max()), "finite": finite,
    }


def judge(m: dict, tol: dict) -> bool:
    bound = tol["max_abs"] * (max(1.0, m["ref_max_abs"]) if tol.get("relative", True) else 1.0)
    return bool(m["finite"] and m["max_abs"] <= bound and m["cosine"] >= tol.get("min_cosine", -1.0))


# ------------------------------------------------------------------------------------------ reference
def _transformers():
    try:
        import transformers
    except ImportError:
        raise BadInputError("validate needs transformers for the torch reference: pip install transformers") from None
    return transformers


def _check_folder_config(folder: Path, cfg: dict) -> None:
    """Before transformers builds anything: no code from the folder, and sizes the weights can hold (a hostile
    config.json would otherwise allocate buffers of its own choosing)."""
    refuse_remote_code(cfg, str(folder))
    if "quantization_config" in cfg:
        return  # packed shapes: transformers' own loader checks them
    from loraport.checkpoint import Checkpoint
    from loraport.onnx.config_check import check_config

    ck = Checkpoint.open(folder)
    try:
        check_config(cfg, {n: tuple(ck.info(n).shape) for n in ck.names()}, f"{folder / 'config.json'}")
    finally:
        ck.close()


def load_torch_model(folder: str | Path, dtype=torch.float32):
    tf = _transformers()
    import warnings

    key = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
    if (Path(folder) / "config.json").is_file():
        _check_folder_config(Path(folder), read_json(Path(folder) / "config.json"))
    try:
        with warnings.catch_warnings(), no_prompt():
            warnings.simplefilter("ignore")
            from transformers.utils import logging as tlog

            tlog.set_verbosity_error()
            tlog.disable_progress_bar()  # CI logs get the report, not "Loading weights" bars
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices on CPU
            m = tf.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **NO_REMOTE_CODE,
                                                        **{key: dtype})
    except (OSError, ValueError, KeyError) as e:
        raise BadInputError(f"{folder}: transformers cannot load this model folder ({str(e).splitlines()[0][:200]})") \
            from None
    m.config.use_cache = False
    return m.eval()


@dataclass
class _Hooked:
    handles: list
    notes: list[str]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _is_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D"


def attach_unmerged(model, base_ckpt, adapters) -> _Hooked:
    """Apply adapters to `model` without merging: forward hooks add each delta's output. Returns the handles."""
    from loraport.engine.plan import build_plan

    plan = build_plan(base_ckpt, adapters, strict=True, tie="auto", resize=True)
    _vocab_like_plan(model, base_ckpt, plan)
    hooked = _Hooked([], [])
    params = {id(p): [] for p in model.parameters()}
    for _mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            params.setdefault(id(p), []).append((m, pn))
    patched = 0
    for name, ups in plan.updates.items():
        slot = find_slot(model, name)
        if slot is None:
            raise BadInputError(f"reference: no module of the transformers model holds {name}")
        if slot.index is not None:  # one expert of a fused expert parameter
            hooked.handles += [_patch_expert(slot, d, w) for d, w in ups]
            patched += len(ups)
            continue
        mod, leaf = slot.module, slot.leaf
        sharers = params.get(id(getattr(mod, leaf)), [(mod, leaf)])
        ups = _set_replacements(getattr(mod, leaf), ups, hooked)
        for d, w in ups:
            # factor hooks where the function is x·Aᵀ·Bᵀ: Linear stores B·A, Conv1D and Embedding store (B·A)ᵀ
            stores_t = _is_conv1d(mod) or isinstance(mod, torch.nn.Embedding)
            f = d.low_rank_factors()
            plain = (f is not None and d.rows is None and leaf == "weight" and len(sharers) == 1
                     and bool(f.transpose) == stores_t and (stores_t or isinstance(mod, torch.nn.Linear)))
            if plain:
                hooked.handles.append(mod.register_forward_hook(_lora_hook(mod, f, w)))
                continue
            W = getattr(mod, leaf).detach().to(torch.float32)
            dW = _dense_delta(d, W) * w
            for m2, l2 in sharers:
                if l2 == "weight" and isinstance(m2, (torch.nn.Linear, torch.nn.Embedding)) or _is_conv1d(m2):
                    hooked.handles.append(m2.register_forward_hook(_dense_hook(m2, dW)))
                else:  # biases, norms, convs: add to the parameter (restored by remove())
                    p = getattr(m2, l2)
                    with torch.no_grad():
                        p.add_(dW.to(p.dtype))
                    hooked.handles.append(_Restore(p, dW))
                    patched += 1
    if patched:
        hooked.notes.append(f"{patched} update(s) to non-matmul parameters were added to the weights directly")
    return hooked


def _vocab_like_plan(model, base_ckpt, plan) -> None:
    """The reference model shaped as the plan's output: its head untied from the embedding where the plan unties
    it, its vocabulary resized where an adapter resizes it (the adapter's values then fill every row)."""
    if base_ckpt.tied() and not plan.base.tied() and model.get_output_embeddings() is not None:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if plan.shapes:
        model.resize_token_embeddings(next(iter(plan.shapes.values()))[0], mean_resizing=False)


def _set_replacements(p: torch.nn.Parameter, ups, hooked: _Hooked):
    """Replacements (modules_to_save, saved layers) set the parameter itself, restored by remove(), so the other
    updates of the tensor apply on top of them as in the merge; returns those others."""
    reps = [(d, w) for d, w in ups if d.replaces_base]
    if not reps:
        return ups
    W = p.detach().to(torch.float32).clone()
    for d, w in reps:
        W = d.replaced(W, w)
    old = p.data
    p.data = W.to(p.dtype)
    hooked.handles.append(_Reset(p, old))
    return [(d, w) for d, w in ups if not d.replaces_base]


class _Reset:
    def __init__(self, p, old):
        self.p, self.old = p, old

    def remove(self):
        self.p.data = self.old


def _dense_delta(d, W: torch.Tensor) -> torch.Tensor:
    """ΔW of one delta against W (row slices expanded to W's shape)."""
    full = torch.zeros_like(W)
    if d.rows is not None:
        a, b = d.rows
        full[a:b] = d.contribution(W[a:b])
    else:
        full = d.contribution(W).reshape(W.shape)
    return full


def _patch_expert(slot, d, w) -> _RestoreRows:
    """Add one delta to its expert's rows of a fused expert parameter (restored by remove())."""
    p = getattr(slot.module, slot.leaf)
    e, a, b = slot.index
    dW = d.contribution(p.detach()[e, a:b].to(torch.float32)) * w
    with torch.no_grad():
        p[e, a:b] += dW.to(p.dtype)
    return _RestoreRows(p, (e, slice(a, b)), dW)


class _RestoreRows:
    def __init__(self, p, idx, dW):
        self.p, self.idx, self.dW = p, idx, dW

    def remove(self):
        with torch.no_grad():
            self.p[self.idx] -= self.dW.to(self.p.dtype)


class _Restore:
    def __init__(self, p, dW):
        self.p, self.dW = p, dW

    def remove(self):
        with torch.no_grad():
            self.p.sub_(self.dW.to(self.p.dtype))


def _lora_hook(mod, f: LowRank, w):
    A = f.A.detach().to(torch.float32)
    B = f.B.detach().to(torch.float32) * float(w * f.scale)
    emb = isinstance(mod, torch.nn.Embedding)

    def hook(m, args, out):
        x = args[0]
        if emb:  # the (B·A)ᵀ table: rows of Aᵀ picked by id, then ·Bᵀ
            return out + (torch.nn.functional.embedding(x, A.t()) @ B.t()).to(out.dtype)
        return out + ((x.to(torch.float32) @ A.t()) @ B.t()).to(out.dtype)

    return hook


def _dense_hook(mod, dW):
    emb = isinstance(mod, torch.nn.Embedding)
    conv1d = _is_conv1d(mod)

    def hook(m, args, out):
        x = args[0]
        if emb:
            return out + torch.nn.functional.embedding(x, dW).to(out.dtype)
        if conv1d:  # weight stored [in, out]
            return out + (x.to(torch.float32) @ dW).to(out.dtype)
        return out + torch.nn.functional.linear(x.to(torch.float32), dW).to(out.dtype)

    return hook


def reference_logits(model, feeds: dict) -> np.ndarray:
    kw = {k: torch.from_numpy(v) for k, v in feeds.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        return model(**kw, use_cache=False).logits.to(torch.float32).numpy()


def make_inputs(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    ids = g.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    am = np.ones((batch, seq), dtype=np.int64)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos}


# ------------------------------------------------------------------------------------------ artifacts
@dataclass
class Artifact:
    kind: str  # safetensors / onnx
    path: Path
    model: Path | None  # the .onnx file
    manifest: dict
    precision: str  # fp32/fp16/bf16/int8/int4/nf4


def detect_artifact(path: str | Path) -> Artifact:
    from loraport.onnx.export import MANIFEST, MODEL_FILE

    p = Path(path)
    if not p.exists():
        raise BadInputError(f"artifact not found: {p}")
    if p.is_dir() and (p / MODEL_FILE).is_file():
        _check_external(p / MODEL_FILE)
        man = _read_manifest(p / MANIFEST)
        prec = man.get("quantize") or man.get("dtype") or _onnx_precision(p / MODEL_FILE)
        return Artifact("onnx", p, p / MODEL_FILE, man, prec)
    if p.is_file() and p.suffix == ".onnx":
        _check_external(p)
        man = _read_manifest(p.parent / MANIFEST) if (p.parent / MANIFEST).is_file() else {}
        if man.get("model") != p.name:
            man = {}
        prec = man.get("quantize") or man.get("dtype") or _onnx_precision(p)
        return Artifact("onnx", p, p, man, prec)
    if p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        cfg = _read_manifest(p / "config.json")
        qc = cfg.get("quantization_config") or {}
        prec = "fp32"
        if isinstance(qc, dict) and qc:
            prec = "nf4" if qc.get("load_in_4bit") else "int8" if qc.get("load_in_8bit") else "int8"
        else:
            prec = _safetensors_precision(p)
        return Artifact("safetensors", p, None, {}, prec)
    raise BadInputError(f"{p}: not an artifact loraport writes (an ONNX folder/.onnx file or a merged model folder)")


def _read_manifest(p: Path) -> dict:
    from loraport import paths

    if not paths.member(p.parent, p).is_file():
        return {}
    return read_json(p, "manifest")


def _check_external(model: Path) -> None:
    """onnxruntime resolves external-data locations itself, following symlinks: hold every location to the
    input-path policy (loraport/paths.py) before it does."""
    import onnx

    from loraport import paths

    try:
        m = onnx.load(str(paths.named(model)), load_external_data=False)
    except Exception as e:  # protobuf DecodeError & co
        raise BadInputError(f"{model}: not a readable ONNX model ({type(e).__name__})") from None
    graphs, seen = [m.graph], set()
    while graphs:
        g = graphs.pop()
        tensors = list(g.initializer)
        for n in g.node:
            for a in n.attribute:
                tensors += ([a.t] if a.HasField("t") else []) + list(a.tensors)
                graphs += ([a.g] if a.HasField("g") else []) + list(a.graphs)
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = next((e.value for e in t.external_data if e.key == "location"), "")
                if loc not in seen:
                    seen.add(loc)
                    paths.external(model, loc)


def _onnx_precision(model: Path) -> str:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    if "MatMulNBits" in ops:
        return "int4"
    if "DequantizeLinear" in ops:
        return "int8"
    types = {t.data_type for t in m.graph.initializer if len(t.dims) == 2}
    return "fp16" if 10 in types else "bf16" if 16 in types else "fp32"


def _safetensors_precision(folder: Path) -> str:
    from loraport.checkpoint import Checkpoint

    ck = Checkpoint.open(folder)
    try:
        dts = {ck.info(n).dtype for n in ck.names()}
    finally:
        ck.close()
    return "bf16" if torch.bfloat16 in dts else "fp16" if torch.float16 in dts else "fp32"


# ------------------------------------------------------------------------------------------ main
def _refuse_gguf(artifact, base) -> None:
    """validate runs artifacts in torch / onnxruntime; a GGUF model runs in llama.cpp (formats/gguf.md)."""
    which = [str(p) for p in (artifact, base) if p is not None and str(p).endswith(".gguf")]
    if which:
        raise BadInputError(f"{which[0]}: validate runs merged safetensors and ONNX, not GGUF (llama.cpp's): "
                            "compare the merged .gguf with the base .gguf + the adapter in llama.cpp "
                            "(`loraport convert ADAPTER --to gguf`, then `llama-cli -m BASE.gguf --lora "
                            "ADAPTER.gguf`; bench/gguf_merged_llamacpp.py), or validate a merge into the "
                            "safetensors base")


def validate(artifact: str | Path, base: str | Path | None = None, adapters: list | None = None, *,
             tolerance: str | float = "auto", provider: str = "auto", active: str = "all", batch: int = 2,
             seq: int = 16, seed: int = 0) -> dict:
    """Compare `artifact` with base + unmerged adapters. Returns the report; `report["passed"]` says whether
    every case is within tolerance (the CLI turns False into exit 1)."""
    from loraport.checkpoint import Checkpoint
    from loraport.formats import load_adapter

    t0 = time.perf_counter()
    _refuse_gguf(artifact, base)
    art = detect_artifact(artifact)
    man = art.manifest
    base, adapters = _reference_inputs(art, base, adapters, active)
    tol = _tolerance(tolerance, art.precision)

    ckpt = Checkpoint.open(base)
    loaded = [(load_adapter(a, base=ckpt), w, str(a)) for a, w in adapters]
    model = load_torch_model(base)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else \
        int(model.config.vocab_size)
    feeds = make_inputs(min(vocab, int(getattr(model.config, "vocab_size", vocab))), batch, seq, seed)

    # the cases: (name, adapters active in the reference, .onnx_adapter to activate)
    cases: list[tuple[str, list, str | None]] = []
    if active.endswith(".onnx_adapter"):  # an adapter file made later with convert --to onnx-adapter
        if not Path(active).is_file():
            raise BadInputError(f"--active {active}: file not found")
        if len(loaded) != 1:
            raise BadInputError("--active <file.onnx_adapter> needs exactly one --adapter (the one it was made from)")
        cases.append((Path(active).stem, [(loaded[0][0], loaded[0][1])], str(active)))
    elif man.get("kind") == "multi-lora" or (art.kind == "onnx" and _has_lora_inputs(art.model)):
        entries = man.get("adapters", [])
        mapping = _match_adapters(entries, loaded)
        choices = ["none", *[e["name"] for e in entries]]
        if active not in ("all", *choices):
            raise BadInputError(f"--active {active!r}: this graph has {', '.join(choices)} (or all)")
        for e in entries:
            if active in ("all", e["name"]):
                ad = mapping[e["name"]]
                cases.append((e["name"], [(ad[0], ad[1])], str(art.path / e["file"])))
        if active in ("all", "none"):
            cases.insert(0, ("none", [], None))
    else:
        if active not in ("all", "merged"):
            raise BadInputError("--active applies to multi-LoRA ONNX graphs only")
        cases.append(("merged", [(a, w) for a, w, _ in loaded], None))

    kind = art.kind if art.kind != "onnx" else f"onnx-{man.get('kind', 'model')}"
    report: dict = {"artifact": str(art.path), "kind": kind,
                    "precision": art.precision, "base": str(base),
                    "adapters": [{"path": p, "format": a.format, "weight": w} for a, w, p in loaded],
                    "inputs": {"batch": batch, "seq": seq, "seed": seed}, "tolerance": tol, "cases": [], "notes": []}
    runner = _runner(art, provider, report)
    passed = True
    for name, active_ads, adapter_file in cases:
        hooked = attach_unmerged(model, ckpt, active_ads) if active_ads else None
        try:
            ref = reference_logits(model, feeds)
        finally:
            if hooked is not None:
                report["notes"] += [n for n in hooked.notes if n not in report["notes"]]
                hooked.remove()
        try:
            out = runner(feeds, adapter_file)
        except RuntimeError as e:  # the runtime cannot execute this artifact (not a parity failure)
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            hint = (" (bitsandbytes' CPU backend cannot run 4-bit layers narrower than the block size)"
                    if art.precision in ("nf4", "fp4", "int4") else "")
            raise BadInputError(f"{art.path}: the artifact could not be run: {msg}{hint}") from None
        m = compare(out, ref)
        ok = judge(m, tol)
        passed &= ok
        report["cases"].append({"case": name, "adapter_file": adapter_file, "outputs": {"logits": m}, "passed": ok})
    report["passed"] = bool(passed)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    ckpt.close()
    return report


def _reference_inputs(art, base, adapters, active: str) -> tuple[str | Path, list[tuple]]:
    """(base, [(adapter, weight)]) of the reference: what --base / --adapter leave out comes from the export's
    description (art.manifest), else from the output's integrity manifest."""
    from loraport.manifest import validate_hints

    man = art.manifest
    hints = validate_hints(art.path) if not base or not adapters else {}
    base = base or man.get("base") or hints.get("base")
    if not base:
        raise BadInputError("--base is required (the model folder the artifact was made from; no manifest names it)")
    if not Path(base).is_dir():
        raise BadInputError(f"--base {base}: not a model folder")
    adapters = [(a, 1.0) if isinstance(a, (str, Path)) else (a[0], float(a[1])) for a in (adapters or [])]
    if not adapters and not active.endswith(".onnx_adapter"):
        if man.get("adapters"):
            adapters = [(a["source"], float(a.get("weight", 1.0))) for a in man["adapters"]]
        elif hints:
            adapters = [(a["source"], a["weight"]) for a in hints["adapters"]]
    return base, adapters


def _has_lora_inputs(model: Path) -> bool:
    from loraport.onnx.adapter_file import graph_slots

    return bool(graph_slots(model))


def _tolerance(tolerance, precision: str) -> dict:
    if isinstance(tolerance, str) and tolerance.strip().lower() == "auto":
        t = dict(TOLERANCES.get(precision, TOLERANCES["fp32"]))
        t.update(mode="auto", precision=precision, relative=True)
        return t
    try:
        v = float(tolerance)
    except (TypeError, ValueError):
        raise BadInputError(f"--tolerance {tolerance!r}: give auto or a number such as 1e-4") from None
    if not v > 0 or math.isinf(v):
        raise BadInputError(f"--tolerance {tolerance!r} must be a positive number")
    return {"mode": "fixed", "max_abs": v, "min_cosine": -1.0, "relative": False,
            "why": f"fixed: max |Δ| ≤ {v:g}", "precision": precision}


def _match_adapters(entries: list[dict], loaded: list) -> dict:
    """Manifest adapter name -> (Adapter, weight): by source path, then name, then position."""
    out = {}
    by_path = {str(identity(p)): (a, w) for a, w, p in loaded}
    by_name = {Path(p).name: (a, w) for a, w, p in loaded}
    for i, e in enumerate(entries):
        hit = by_path.get(e.get("source", "")) or by_name.get(e["name"]) or (
            (loaded[i][0], loaded[i][1]) if i < len(loaded) else None)
        if hit is None:
            raise BadInputError(f"multi-LoRA adapter {e['name']!r}: pass its source adapter with --adapter "
                                f"({e.get('source')})")
        out[e["name"]] = hit
    return out


def _runner(art: Artifact, provider: str, report: dict):
    if art.kind == "onnx":
        from loraport.onnx.runtime import open_session

        sess = open_session(art.model, provider=provider, qdq_accuracy_level="0")
        report["providers"] = sess.providers
        report["providers_requested"] = sess.requested
        report["qdq_matmulnbits_accuracy_level"] = sess.qdq_accuracy_level

        if sess.with_past:
            from loraport.onnx.past import step_splits

            report["notes"].append(WITH_PAST_NOTE)

            def run_past(feeds, adapter_file):
                splits = step_splits(feeds["input_ids"].shape[1])
                return np.asarray(sess.run_steps(feeds, splits, adapter_file), dtype=np.float32)

            return run_past

        def run(feeds, adapter_file):
            return np.asarray(sess.run(feeds, adapter_file)[0], dtype=np.float32)

        return run
    if provider not in ("auto", "cpu"):
        raise BadInputError("--provider applies to ONNX artifacts; a safetensors folder runs in torch on CPU")
    model = load_torch_model(art.path)
    report["providers"] = ["torch-cpu"]

    def run_torch(feeds, adapter_file):
        return reference_logits(model, feeds)

    return run_torch
