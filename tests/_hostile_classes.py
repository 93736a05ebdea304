"""Builders of the hostile inputs of issue 14 ("trust no folder"), shared by the regression tests
(test_path_policy.py, test_hostile_parsing.py, test_cache_trust.py) and bench/robustness_report.py, so the
report reproduces exactly what the tests check:

* paths: a file symlinked to a secret outside the folder, a Hugging Face cache snapshot (and one whose link
  leaves its repo's blobs/), an ONNX model whose external data is a plain file (to symlink away);
* remote code: a model folder whose config.json has `auto_map` and a .py file that leaves a marker if it runs;
* pattern bombs: PEFT adapters and diffusers files with rank/alpha patterns of any count, on any module leaf;
* amplification: a sparse GGUF file with a huge metadata array, a safetensors header of very many entries, a
  JSON file padded past the cap, a base whose config.json lies about its shapes;
* cache: a real small captured graph, and what someone who can write the cache folder does to an entry;
* batch: an adapter folder where two inputs map to one output name;
* ONNX: a small external-data model with a hook to damage its fields; rank 0: a PEFT adapter with no rank.

Every builder writes only below the folder it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEFT_LLAMA = ROOT / "fixtures" / "peft" / "bases" / "llama"  # with tokenizer and generation config
PEFT_PLAIN = ROOT / "fixtures" / "peft" / "adapters" / "llama_plain"
LLM_LLAMA = ROOT / "fixtures" / "llm" / "bases" / "llama"
LLM_LORA = ROOT / "fixtures" / "llm" / "peft" / "llama_lora"
MARK = b"SECRET-OUTSIDE-THE-FOLDER!"
REV = "0123456789abcdef0123456789abcdef01234567"
RUN = "a" * 40 + "_x"  # a module leaf on which (a+)+$ backtracks 2**40 ways (a hang before the guard)


# ------------------------------------------------------------------------------------------------ paths
def secret(tmp: Path, size: int = 4096) -> Path:
    """A file outside every input folder that no output may ever hold a byte of."""
    p = tmp / "elsewhere" / "secret.bin"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes((MARK * (size // len(MARK) + 1))[:size])
    return p


def plant(link: Path, target) -> None:
    """Make `link` a symlink to `target` (replacing the file there)."""
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)


def secret_leaked(root: Path) -> list[Path]:
    """Files under `root` (outside its `elsewhere/`) holding the secret's bytes: must stay empty."""
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and "elsewhere" not in p.parts
            and MARK[:16] in p.read_bytes()]


def onnx_llama_base(d: Path, llama: Path = PEFT_LLAMA) -> Path:
    """An ONNX model holding the fixture llama's weights as external data (weights.bin), one MatMul per
    weight named by module scope: the container a bake reads."""
    import onnx
    from onnx import TensorProto, helper

    from loraport.checkpoint import Checkpoint

    ck = Checkpoint.open(llama)
    d.mkdir(parents=True)
    inits, nodes, outs, off = [], [], [], 0
    with open(d / "weights.bin", "wb") as f:
        for i, n in enumerate(ck.names()):
            a = ck.get(n).float().numpy()
            t = TensorProto(name=n, data_type=TensorProto.FLOAT, dims=list(a.shape),
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", "weights.bin"), ("offset", str(off)), ("length", str(a.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            f.write(a.tobytes())
            off += a.nbytes
            inits.append(t)
            nodes.append(helper.make_node("MatMul", ["x", n], [f"y{i}"],
                                          name="/" + n.rsplit(".", 1)[0].replace(".", "/") + "/MatMul"))
            outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    ck.close()
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], outs,
                          initializer=inits)
    onnx.save(helper.make_model(g), str(d / "model.onnx"))
    return d / "model.onnx"


def hf_cache(src: Path, cache: Path, repo: str = "org/tiny", commit: str = REV, ref: str | None = "main") -> Path:
    """`src` laid out as huggingface_hub's cache does: models--org--name/blobs/<sha256> holds the bytes,
    snapshots/<commit>/<file> is a relative symlink to its blob, refs/<ref> names the commit. Several commits
    (or repos) may share one cache. Returns the snapshot folder."""
    r = cache / ("models--" + repo.replace("/", "--"))
    snap = r / "snapshots" / commit
    (r / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = r / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (r / "refs").mkdir(exist_ok=True)
        (r / "refs" / ref).write_text(commit)
    return snap


# ------------------------------------------------------------------------------------------------ remote code
EVIL = """from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil_llama"
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def evil_folder(tmp_path: Path, base: Path = LLM_LLAMA) -> tuple[Path, Path]:
    """A copy of `base` whose config.json names code in the folder (auto_map, an unknown model_type only that
    code can build) and that code, which writes the returned marker file when it runs."""
    folder, marker = tmp_path / "evil_base", tmp_path / "MARKER"
    shutil.copytree(base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evil_llama"
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)))
    return folder, marker


# ------------------------------------------------------------------------------------------------ pattern bombs
def peft_adapter(folder: Path, n_modules: int, rank: int = 2, cfg_extra: dict | None = None,
                 leaf: str = "x_proj") -> Path:
    """A PEFT LoRA folder with `n_modules` modules `model.layers.<i>.mlp.<leaf>` and the config's extras."""
    import torch

    from loraport.safetensors_io import save_file

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(n_modules):
        t[f"base_model.model.model.layers.{i}.mlp.{leaf}.lora_A.weight"] = torch.randn(rank, 4, generator=g)
        t[f"base_model.model.model.layers.{i}.mlp.{leaf}.lora_B.weight"] = torch.randn(4, rank, generator=g)
    save_file(t, folder / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 4, **(cfg_extra or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def diffusers_file(path: Path, n_modules: int, meta: dict, leaf: str = "to_q") -> Path:
    """A diffusers LoRA file whose `lora_adapter_metadata` is `meta` (where rank/alpha patterns live)."""
    import torch

    from loraport.safetensors_io import save_file

    t = {}
    for i in range(n_modules):
        t[f"unet.blocks.{i}.attn.{leaf}.lora_A.weight"] = torch.ones(2, 4)
        t[f"unet.blocks.{i}.attn.{leaf}.lora_B.weight"] = torch.ones(4, 2)
    save_file(t, path, {"lora_adapter_metadata": json.dumps(meta)})
    return path


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of the folder `src` whose config file (adapter_config.json or config.json) has `changes`."""
    shutil.copytree(src, dst)
    cfg_file = dst / ("adapter_config.json" if (dst / "adapter_config.json").is_file() else "config.json")
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))
    return dst


def on_worker(fn, timeout: float = 20):
    """Run fn on a worker thread (where no signal can interrupt it): (exception or None, seconds). A body
    still running after `timeout` is a hang (concurrent.futures.TimeoutError); its thread is left behind."""
    ex = ThreadPoolExecutor(1)
    t0 = time.perf_counter()
    fut = ex.submit(fn)
    try:
        fut.result(timeout=timeout)
        err = None
    except Exception as e:  # noqa: BLE001 - inspected by the caller (a hang is a TimeoutError)
        err = e
    finally:
        ex.shutdown(wait=False)
    return err, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ amplification
def gguf_adapter_with_array(path: Path, count: int) -> Path:
    """A GGUF LoRA header whose metadata holds a uint8 array of `count` zeros (written sparse)."""
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kv = (s("general.type") + struct.pack("<I", 8) + s("adapter")
          + s("adapter.type") + struct.pack("<I", 8) + s("lora")
          + s("x.bomb") + struct.pack("<I", 9) + struct.pack("<IQ", 0, count))
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + kv)
        f.seek(count - 1, 1)
        f.write(b"\0")
    return path


def safetensors_many_entries(path: Path, n: int) -> Path:
    """A well-formed safetensors file of `n` one-byte tensors (its header is ~70 bytes per entry)."""
    body = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n))
    raw = ("{" + body + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * n)
    return path


def pad_json(path: Path, size: int, keep_head: bool = True) -> Path:
    """Grow a JSON file to `size` bytes: a valid head then trailing whitespace (sparse), or zeros throughout."""
    if keep_head:
        with open(path, "r+b") as f:
            f.seek(size - 1)
            f.write(b" ")
    else:
        with open(path, "ab") as f:
            f.truncate(size)
    return path


# config.json values that lie about the weights: (field, value, what the one-line refusal names)
HOSTILE_CONFIGS = [("num_hidden_layers", 300, "decoder layers"), ("num_hidden_layers", 3000, "expected 1.."),
                   ("head_dim", 2**33, "head_dim"), ("num_attention_heads", 8, "q_proj"),
                   ("hidden_size", "32", "integer")]


# ------------------------------------------------------------------------------------------------ cache
def tiny_capture(tag: str):
    """A small but real graph_cache.Captured (no trace needed) for exercising the cache folder."""
    import torch
    from onnx import TensorProto, helper

    from loraport.onnx import graph_cache

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"], name=tag)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])])
    return graph_cache.Captured(helper.make_model(g), [], {"inv_freq": torch.arange(4.0)}, ["x"], "test")


def forge_meta(entry: Path, attacker_key: bytes | None) -> None:
    """What someone who can write the cache folder (but has no key) does: swap the graph for another one and
    rewrite meta.json so every size and sha256 matches; sign it with their own key, or not at all."""
    import onnx

    from loraport import cache_key
    from loraport.onnx import graph_cache

    proto = onnx.load_model_from_string((entry / graph_cache.GRAPH).read_bytes())
    for n in proto.graph.node:
        if n.op_type == "Mul":
            n.op_type = "Add"  # a different computation, same wiring
            break
    proto.graph.doc_string = "swapped"
    data = proto.SerializeToString()
    (entry / graph_cache.GRAPH).write_bytes(data)
    meta = json.loads((entry / graph_cache.META).read_text())
    meta["files"][graph_cache.GRAPH] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta.pop("mac", None)
    if attacker_key is not None:
        meta["mac"] = cache_key.mac(attacker_key, graph_cache.SCHEMA, meta)
    (entry / graph_cache.META).write_text(json.dumps(meta))


def forge_hash_entry(cache_file: Path, real_path: str, attacker_key: bytes | None) -> None:
    """Rewrite the sha256 remembered for `real_path` in the hash cache (identity kept), unsigned or signed
    with another key."""
    from loraport import cache_key
    from loraport import manifest as mf

    d = json.loads(cache_file.read_text())
    d["entries"][real_path][5] = "0" * 64
    d.pop("mac", None)
    if attacker_key is not None:
        d["mac"] = cache_key.mac(attacker_key, mf.CACHE_SCHEMA, d["entries"])
    cache_file.write_text(json.dumps(d))


# ------------------------------------------------------------------------------------------------ batch
def colliding_batch(d: Path, stem: str = "tuned") -> tuple[Path, Path]:
    """An --adapter-dir folder holding `<stem>.gguf` and `<stem>/` (an MLX adapter): both map to OUT/<stem>."""
    llm = ROOT / "fixtures" / "llm"
    d.mkdir()
    shutil.copy(llm / "gguf" / "llama_lora.gguf", d / f"{stem}.gguf")
    shutil.copytree(llm / "mlx" / "llama_lora", d / stem)
    return d / f"{stem}.gguf", d / stem


# ------------------------------------------------------------------------------------------------ ONNX fields
def onnx_small_base(tmp_path: Path, mutate) -> Path:
    """m.onnx: a MatMul on `layer.weight` (20×30) and an unused `other` (4), both external in m.onnx.data;
    `mutate(layer_init, other_init)` damages the TensorProtos before saving."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    w = np.arange(600, dtype=np.float32).reshape(20, 30)
    (tmp_path / "m.onnx.data").write_bytes(w.tobytes() + np.ones(4, np.float32).tobytes())
    inits = []
    for name, dims, off, n in (("layer.weight", [20, 30], 0, w.nbytes), ("other", [4], w.nbytes, 16)):
        init = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "m.onnx.data"), ("offset", str(off)), ("length", str(n))):
            e = init.external_data.add()
            e.key, e.value = k, v
        inits.append(init)
    mutate(*inits)
    node = helper.make_node("MatMul", ["x", "layer.weight"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 30])], inits)
    p = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(g), str(p))
    return p


def onnx_small_adapter(ad: Path) -> Path:
    """A PEFT LoRA on `layer` (the weight of onnx_small_base)."""
    import torch

    from loraport.safetensors_io import save_file

    ad.mkdir()
    save_file({"base_model.model.layer.lora_A.weight": torch.ones(2, 30),
               "base_model.model.layer.lora_B.weight": torch.ones(20, 2)}, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    return ad


def set_ext(key: str, value: str):
    def f(init, other):
        for e in init.external_data:
            if e.key == key:
                e.value = value
    f.__name__ = f"{key}={value[:12]}"
    return f


def inline_bad_raw(init, other):
    from onnx import TensorProto

    init.ClearField("external_data")
    init.data_location = TensorProto.DEFAULT
    init.raw_data = b"\0" * 7


def huge_dims(init, other):  # on a tensor the plan does not check: only the reader sees it
    del other.dims[:]
    other.dims.extend([2**40, 2**40])


# (damage, what the one-line refusal names)
ONNX_FIELD_CASES = [(set_ext("offset", "abc"), "offset"), (set_ext("offset", "-64"), "offset"),
                    (set_ext("length", "-1"), "length"), (set_ext("length", "9" * 40), "length"),
                    (set_ext("location", "../x"), "inside the model"), (huge_dims, "elements"),
                    (inline_bad_raw, "inline data")]


# ------------------------------------------------------------------------------------------------ rank 0
def rank0_adapter(dst: Path, src: Path = LLM_LORA) -> Path:
    """A copy of the PEFT adapter `src` whose every lora_A has 0 rows and lora_B 0 columns."""
    from loraport.safetensors_io import SafetensorsFile, save_file

    shutil.copytree(src, dst)
    f = SafetensorsFile(src / "adapter_model.safetensors")
    t = f.load_all()
    f.close()
    zero = {k: (v[:0] if ".lora_A." in k else v[:, :0]).contiguous() for k, v in t.items()}
    save_file(zero, dst / "adapter_model.safetensors")
    return dst
