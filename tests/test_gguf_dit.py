"""DiT GGUF bases as ComfyUI-GGUF ships them (tests/_gguf_dit_util.py: city96's convert.py layout — original
single-file names, general.architecture flux / wan / qwen_image, 5-D and reshaped tensors), merged with kohya /
diffusers / musubi LoRAs through the DiT name tables; `inspect` of a GGUF base and `validate`'s refusal.

Oracle: the same merge (loraport, already checked against diffusers by test_dit_*.py) into the single
.safetensors file of the GGUF's weights dequantized by gguf.quants, re-quantized per tensor by gguf.quants,
equals the merged GGUF's codes; dequantized, the merged GGUF is within the type's error (the base's rounding
plus the re-rounding) of the merge into the original fp32 single file. Types, shapes and metadata: read back
by gguf.GGUFReader."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from _gguf_dit_util import comfy_gguf, dequantized
from _peft_util import cli
from safetensors.torch import load_file, save_file

from loraport.quant import ggml

F = Path(__file__).resolve().parents[1] / "fixtures" / "dit"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@functools.lru_cache(maxsize=1)
def _wide_flux_cached() -> dict[str, torch.Tensor]:
    """A Flux transformer (diffusers' own class) 64 wide — rows of 64 / 256 are whole quantization blocks — in
    BFL single-file names (the fixture maker's to_bfl)."""
    from diffusers import FluxTransformer2DModel

    spec = importlib.util.spec_from_file_location("dit_maker", F.parent / "makers" / "dit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = {**mod.CONFIG, "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
           "pooled_projection_dim": 32, "axes_dims_rope": (8, 12, 12), "num_layers": 1, "num_single_layers": 1}
    torch.manual_seed(5)
    sd = FluxTransformer2DModel(**cfg).state_dict()
    return mod.to_bfl(sd, 1, 1)


def _wide_flux() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _wide_flux_cached().items()}


# kohya (BFL module names, fused qkv / linear1 whole) and diffusers (split q/k/v: row slices of the fused ones)
KOHYA = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
         "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1", "single_blocks.0.linear2"]
DIFFUSERS = {"transformer_blocks.0.attn.to_q": (64, 64), "transformer_blocks.0.attn.to_v": (64, 64),
             "transformer_blocks.0.ff.net.0.proj": (256, 64), "single_transformer_blocks.0.proj_mlp": (256, 64),
             "single_transformer_blocks.0.attn.to_k": (64, 64)}


def _lora(base: dict[str, torch.Tensor], dialect: str, path: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    sd = {}
    if dialect == "kohya":
        for m in KOHYA:
            out, inp = base[f"{m}.weight"].shape
            k = "lora_unet_" + m.replace(".", "_")
            sd[f"{k}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.2
            sd[f"{k}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.05
            sd[f"{k}.alpha"] = torch.tensor(8.0)
    else:
        for m, (out, inp) in DIFFUSERS.items():
            sd[f"transformer.{m}.lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.2
            sd[f"transformer.{m}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.05
    save_file(sd, str(path))
    return path


def _merge(base: Path, lora: Path, out: Path, *extra) -> dict:
    res = cli("merge", "--base", base, "--adapter", lora, "--out", out, "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _check(tmp: Path, sd: dict[str, torch.Tensor], arch: str, qtype: str, lora: Path, **kw) -> dict:
    """Merge `lora` into the ComfyUI GGUF of `sd` and check it against the single-file merges (module doc)."""
    base = tmp / "base.gguf"
    types = comfy_gguf(sd, base, arch, qtype, **kw)
    before = base.read_bytes()
    rep = _merge(base, lora, tmp / "merged.gguf")
    assert base.read_bytes() == before
    deq = dequantized(base)
    save_file(deq, str(tmp / "deq.safetensors"))
    want = load_file(str(_merge_file(tmp / "deq.safetensors", lora, tmp / "deq-merged.safetensors")))
    pre = "model.diffusion_model." if kw.get("prefix") else ""
    save_file({pre + k: v.float() for k, v in sd.items()}, str(tmp / "fp32.safetensors"))
    exact = load_file(str(_merge_file(tmp / "fp32.safetensors", lora, tmp / "fp32-merged.safetensors")))
    rb, ro = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(tmp / "merged.gguf"))
    assert [(t.name, list(t.shape)) for t in rb.tensors] == [(t.name, list(t.shape)) for t in ro.tensors]
    meta = {k: f.contents() for k, f in rb.fields.items() if not k.startswith("GGUF.")}
    assert {k: f.contents() for k, f in ro.fields.items() if not k.startswith(("GGUF.", "loraport."))} == meta
    got = dequantized(tmp / "merged.gguf")
    updated = {}
    for b, o in zip(rb.tensors, ro.tensors):
        if torch.equal(want[b.name], deq[b.name]):  # untouched: byte for byte, same type
            assert o.tensor_type == b.tensor_type and np.array_equal(o.data, b.data), b.name
            continue
        updated[b.name] = (b.tensor_type.name, o.tensor_type.name)
        w = np.ascontiguousarray(want[b.name].numpy()).reshape(o.data.shape[:-1] + (-1,))
        x, w0 = exact[b.name].float(), sd[b.name.removeprefix(pre)].float()
        e0 = float((deq[b.name] - w0).abs().max())  # the base's rounding
        try:
            codes = gguf.quants.quantize(w, o.tensor_type)
        except NotImplementedError:  # a k-quant written as itself (gguf-py has no quantizer): 4+ bits' error
            assert float((got[b.name] - want[b.name]).abs().max()) <= 0.1 * float(want[b.name].abs().max()), b.name
            continue
        assert np.array_equal(codes.reshape(-1).view(np.uint8), o.data.reshape(-1).view(np.uint8)), b.name
        e1 = float((torch.from_numpy(gguf.quants.dequantize(codes, o.tensor_type)).reshape(x.shape)
                    - want[b.name]).abs().max())  # the re-rounding
        assert float((got[b.name] - x).abs().max()) <= e0 + e1 + 1e-5, b.name
    assert updated and set(types[n] for n in updated) <= {"F32", "F16", "BF16", qtype}
    return {"report": rep, "updated": updated}


def _merge_file(base: Path, lora: Path, out: Path) -> Path:
    _merge(base, lora, out)
    return out


@pytest.mark.parametrize("dialect,qtype,kw", [
    ("kohya", "Q8_0", {}), ("diffusers", "Q4_0", {"prefix": True}), ("kohya", "BF16", {}),
    ("kohya", "Q5_1", {"reshape": ("double_blocks.0.img_mlp.0.weight",)}),
])
def test_flux_gguf_merge_is_the_single_file_merge_quantized(tmp_path, dialect, qtype, kw):
    sd = _wide_flux()
    r = _check(tmp_path, sd, "flux", qtype, _lora(sd, dialect, tmp_path / "lora.safetensors"), **kw)
    quantized = [n for n, (a, b) in r["updated"].items() if a == b == qtype]
    assert len(quantized) >= 3, r["updated"]  # the fused qkv / linear1 and MLP weights, re-quantized in place
    if kw.get("reshape"):
        assert r["updated"]["double_blocks.0.img_mlp.0.weight"] == (qtype, qtype)


def test_flux_k_quant_base_writes_fallback_and_inspect_says_so(tmp_path):
    """An updated k-quant is written in its fallback type with a warning (or, once loraport writes k-quants, as
    itself), and `inspect ADAPTER --base` says so beforehand."""
    sd = _wide_flux()
    lora = _lora(sd, "kohya", tmp_path / "lora.safetensors")
    r = _check(tmp_path, sd, "flux", "Q4_K", lora)
    written = ggml.writable(ggml.BY_NAME["Q4_K"]).name  # Q5_0 while loraport writes no k-quants
    assert r["updated"]["double_blocks.0.img_mlp.2.weight"] == ("Q4_K", written)  # rows of 256: a k-quant
    assert any(f"written as {written}" in w for w in r["report"]["warnings"]) == (written != "Q4_K")
    res = cli("inspect", lora, "--base", tmp_path / "base.gguf", "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["base"]["merge"]
    per_type: dict[str, int] = {}
    for a, b in r["updated"].values():
        key = f"{a} -> {b}" if a != b else a
        per_type[key] = per_type.get(key, 0) + 1
    assert m["written"] == per_type and m["updated"] == len(r["updated"]), m
    assert m["copied"] == len(gguf.GGUFReader(str(tmp_path / "base.gguf")).tensors) - m["updated"]


def test_wan_gguf_with_5d_patch_embedding(tmp_path):
    sd = load_file(str(F / "wan-original.safetensors"))
    assert sd["patch_embedding.weight"].dim() == 5
    r = _check(tmp_path, sd, "wan", "Q8_0", F / "wan_musubi.safetensors", small=0)  # micro model: no threshold
    assert "blocks.0.ffn.2.weight" in r["updated"]
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "merged.gguf")).tensors}["patch_embedding.weight"]
    assert len(t.shape) == 5 and t.tensor_type.name == "F32"


def test_qwen_image_gguf(tmp_path):
    sd = load_file(str(F / "qwen-diffusers" / "transformer" / "diffusion_pytorch_model.safetensors"))
    r = _check(tmp_path, sd, "qwen_image", "Q4_1", F / "qwen_diffusers.safetensors", small=0)
    assert any(a == "Q4_1" for a, _ in r["updated"].values()), r["updated"]


def test_inspect_gguf_base_storage_per_family(tmp_path):
    sd = _wide_flux()
    base = tmp_path / "base.gguf"
    types = comfy_gguf(sd, base, "flux", "Q8_0")
    res = cli("inspect", base, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["kind"] == "gguf-base"
    b = rep["base"]
    r = gguf.GGUFReader(str(base))
    by_type: dict[str, int] = {}
    for t in r.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    assert b["architecture"] == "flux" and b["tensors"] == len(sd) and b["bytes"] == by_type
    assert b["storage"] == {k: list(types.values()).count(k) for k in set(types.values())}
    assert sum(f["count"] for f in b["families"].values()) == len(sd)
    assert b["families"]["double_blocks.*.img_mlp.*.weight"]["types"] == {"Q8_0": 2}
    assert b["fallbacks"] == {}
    text = cli("inspect", base)
    assert text.exit_code == 0 and "GGUF base" in text.stdout and "Q8_0" in text.stdout


def test_gguf_base_corrupt_orig_shape_and_validate_are_one_line(tmp_path):
    sd = _wide_flux()
    base = tmp_path / "base.gguf"
    comfy_gguf(sd, base, "flux", "Q8_0", reshape=("double_blocks.0.img_mlp.0.weight",))
    raw = base.read_bytes()
    # the recorded shape [256, 64] -> [256, 63]: no longer the tensor's element count
    i = raw.find(b"comfy.gguf.orig_shape.double_blocks.0.img_mlp.0.weight")
    j = raw.find(np.array([256, 64], dtype=np.int32).tobytes(), i)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw[:j + 4] + np.int32(63).tobytes() + raw[j + 8:])
    lora = _lora(sd, "kohya", tmp_path / "lora.safetensors")
    res = cli("merge", "--base", bad, "--adapter", lora, "--out", tmp_path / "m.gguf")
    assert res.exit_code == 2 and "orig_shape" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.gguf").exists()
    _merge(base, lora, tmp_path / "m.gguf")
    res = cli("validate", tmp_path / "m.gguf", "--base", base, "--adapter", lora)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = [x for x in res.stderr.strip().splitlines() if x.startswith("error")]
    assert len(line) == 1 and "llama.cpp" in line[0] and "loraport convert" in line[0]


@pytest.mark.parametrize("value", [[7] * 500, "x" * 300, [-4, -256]])
def test_hostile_orig_shape_is_one_line(tmp_path, value):
    """A recorded shape that is long, not an int array, or negative: one line naming the key, nothing written."""
    base = tmp_path / "h.gguf"
    w = gguf.GGUFWriter(str(base), "flux")
    key = "comfy.gguf.orig_shape.double_blocks.0.img_mlp.0.weight"
    w.add_array(key, value) if isinstance(value, list) else w.add_string(key, value)
    w.add_tensor("double_blocks.0.img_mlp.0.weight", np.zeros((4, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = cli("merge", "--base", base, "--adapter", F / "flux_kohya.safetensors", "--out", tmp_path / "m.gguf")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1 and key in res.stderr, res.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_inspect_merged_gguf_shows_its_provenance(tmp_path):
    sd = _wide_flux()
    base, out = tmp_path / "base.gguf", tmp_path / "m.gguf"
    comfy_gguf(sd, base, "flux", "Q8_0")
    lora = _lora(sd, "kohya", tmp_path / "lora.safetensors")
    _merge(base, lora, out)
    assert "provenance" not in json.loads(cli("inspect", base, "--json").stdout)
    rep = json.loads(cli("inspect", out, "--json").stdout)
    assert rep["kind"] == "gguf-base" and rep["base"]["merged_by"]
    assert [a["path"] for a in rep["provenance"]["loraport.adapters"]] == [str(lora)]
    assert rep["base"]["storage"] == json.loads(cli("inspect", base, "--json").stdout)["base"]["storage"]
