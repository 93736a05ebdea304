"""Shared steps of the DiT family tests: load a fixture maker by path, derive the files a test makes itself (a
base under ComfyUI's prefix, a LoRA in OneTrainer's spelling), merge and read back in the base's own names,
compare, and check a family's table against both layouts of its micro model."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraport.api import merge
from loraport.names import dit

F = Path(__file__).resolve().parents[1] / "fixtures" / "dit"
COMFY = "model.diffusion_model."  # ComfyUI's prefix on a checkpoint's transformer weights


@cache
def maker(name: str):
    """fixtures/makers/<name>.py as a module (cached: the tests only read its pure-torch helpers)."""
    spec = importlib.util.spec_from_file_location(f"{name}_maker", F.parent / "makers" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def single_file(weights: Path | dict[str, torch.Tensor], dst: Path, prefix: str = COMFY) -> Path:
    """`weights` (a .safetensors file or a state dict) saved as one file under `prefix`: ComfyUI's by default, ""
    for the bare transformer."""
    sd = load_file(weights) if isinstance(weights, Path) else weights
    save_file({prefix + k: v for k, v in sd.items()}, dst)
    return dst


def onetrainer(src: Path, dst: Path) -> Path:
    """A diffusers-dialect LoRA (`transformer.<path>.lora_A/B`) as OneTrainer names it: lora_transformer_<path>,
    lora_down / lora_up, alpha 8 = the fixtures' lora_alpha, so diffusers' fuse of `src` is its reference too."""
    t = {}
    for k, v in load_file(src).items():
        mod, _, role = k.removeprefix("transformer.").rpartition(".lora_")
        name = "lora_transformer_" + mod.replace(".", "_")
        t[f"{name}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = v
        t[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(t, dst)
    return dst


def merged(base: Path, lora: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """loraport's merge of `lora` into `base` (a folder or a single file), in the base's own names (ComfyUI's
    model.diffusion_model. prefix stripped)."""
    out = tmp / ("o" if base.is_dir() else "o.safetensors")
    merge(base, [str(lora)], out)
    if base.is_dir():
        return folder_weights(out)
    return {k.removeprefix(COMFY): v for k, v in load_file(out).items()}


def max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 0.0) -> float:
    """The largest |got - want| over tensors with the same names and shapes, less `rel`·|want| (a storage dtype's
    step)."""
    assert set(got) == set(want)
    assert all(got[k].shape == want[k].shape for k in want), [k for k in want if got[k].shape != want[k].shape]
    return max(float(((got[k].float() - want[k].float()).abs() - rel * want[k].float().abs()).max()) for k in want)


def assert_table_covers(family: str, folder: Path, single: Path) -> None:
    """Each 2-D weight of the diffusers model and of the original file is some row's, and every row maps between
    two tensors of matching shape (fused parts sized from the input width)."""
    table = dit.TABLES[family]
    dif = {k[:-7]: v.shape for k, v in folder_weights(folder).items() if k.endswith(".weight") and v.dim() == 2}
    orig = {k[:-7]: v.shape for k, v in load_file(single).items() if k.endswith(".weight") and v.dim() == 2}
    for col, names, other in (("diffusers", dif, orig), ("original", orig, dif)):
        to = "original" if col == "diffusers" else "diffusers"
        for mod, shape in names.items():
            pieces = table.translate(mod, col, to, shape[1], shape[0], lambda m, o=other: o.get(m))
            assert pieces, f"{mod} ({col}) is in no row"
            assert sum((p.lora_rows[1] - p.lora_rows[0]) if p.lora_rows else shape[0] for p in pieces) == shape[0]
            for p in pieces:
                assert p.module in other, f"{mod} -> {p.module}"
                rows = (p.rows[1] - p.rows[0]) if p.rows else other[p.module][0]
                assert rows == ((p.lora_rows[1] - p.lora_rows[0]) if p.lora_rows else shape[0]), mod


def diffusers_fuse(make, base: dict[str, torch.Tensor], pipeline, lora: Path) -> dict[str, torch.Tensor]:
    """What diffusers makes of a LoRA file: `pipeline.lora_state_dict` (its converters) → load_lora_adapter →
    fuse_lora in fp32 on the micro model `make()` holding `base`; the weights after."""
    m = make()
    m.load_state_dict(base)
    state, meta = pipeline.lora_state_dict(str(lora), return_lora_metadata=True)
    m.load_lora_adapter(state, prefix="transformer", metadata=meta)
    m.fuse_lora(lora_scale=1.0)
    m.unload_lora()
    return {k: v.detach() for k, v in m.state_dict().items()}
