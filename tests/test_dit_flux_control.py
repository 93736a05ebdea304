"""Flux Control LoRAs (BFL Canny / Depth: LoRA factors with lora_B.bias, qk-norm scales that replace the base's, an
img_in LoRA wider than the base) and fal Kontext LoRAs (PEFT keys on BFL names under base_model.model.), merged
into both base layouts against what diffusers computes (fixtures/makers/dit_flux_control.py: FluxControlPipeline
.load_lora_weights, its expansion of x_embedder, fuse_lora in fp32). The slow test runs the merged folder in
diffusers on the widened input against the unfused LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import inspect, merge
from loraport.errors import LoraportError
from tests._dit_util import F, folder_weights, maker, max_diff
from tests._sd_util import run_cli

BASES = {"diffusers": F / "flux-diffusers", "bfl": F / "flux-bfl.safetensors"}
CONTROL = F / "flux_control.safetensors"
KONTEXT = F / "flux_kontext_fal.safetensors"


def _expected(name: str, layout: str) -> dict[str, torch.Tensor]:
    want = {**folder_weights(BASES["diffusers"]), **load_file(F / f"expect_flux_{name}.safetensors")}
    if layout == "diffusers":
        return want
    mk = maker("dit")
    return mk.to_bfl(want, mk.CONFIG["num_layers"], mk.CONFIG["num_single_layers"])


def _merged(layout: str, lora: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    rep = merge(BASES[layout], [str(lora)], out)
    return folder_weights(out) if layout == "diffusers" else load_file(out), rep


@pytest.mark.parametrize("layout", list(BASES))
def test_control_lora_merge_matches_diffusers(layout, tmp_path):
    """Replace the norm scales, widen x_embedder / img_in with zero columns, add every B@A and lora_B.bias: what
    FluxControlPipeline + fuse_lora make, within 1e-5; the folder's config says the new input width."""
    out = tmp_path / ("o" if layout == "diffusers" else "o.safetensors")
    got, rep = _merged(layout, CONTROL, out)
    want = _expected("control", layout)
    x = "x_embedder.weight" if layout == "diffusers" else "img_in.weight"
    assert want[x].shape[1] == 8 and load_file(CONTROL)["img_in.lora_A.weight"].shape[1] == 8
    assert max_diff(got, want) <= 1e-5
    assert torch.equal(got[x][:, 4:], want[x][:, 4:]) or max_diff({x: got[x][:, 4:]}, {x: want[x][:, 4:]}) <= 1e-5
    assert any("control LoRA" in w and "from 4 to 8 input columns" in w for w in rep["warnings"])
    if layout == "diffusers":
        cfg = json.loads((out / "transformer" / "config.json").read_text())
        assert cfg["in_channels"] == 8 and cfg["out_channels"] == 4
        assert any("in_channels 4 → 8" in w for w in rep["warnings"])
        base_cfg = json.loads((BASES["diffusers"] / "transformer" / "config.json").read_text())
        assert base_cfg["in_channels"] == 4  # the input is untouched


@pytest.mark.parametrize("layout", list(BASES))
def test_kontext_fal_lora_merge_matches_diffusers(layout, tmp_path):
    out = tmp_path / ("o" if layout == "diffusers" else "o.safetensors")
    got, rep = _merged(layout, KONTEXT, out)
    assert max_diff(got, _expected("kontext_fal", layout)) <= 1e-5
    assert not any("control" in w for w in rep["warnings"])
    assert inspect(KONTEXT).report["family"]["dialects"] == ["peft_original"]


def test_inspect_says_a_control_lora_changes_the_input():
    rep = inspect(CONTROL).report
    ctl = rep["family"]["control"]
    assert ctl["replaces"] == 12 and ctl["input_columns"] == 8 and ctl["base_columns"] is None
    assert any("Flux Control LoRA" in n and "input contract" in n for n in rep["notes"])
    rep = inspect(CONTROL, base=BASES["bfl"]).report
    assert rep["family"]["control"]["base_columns"] == 4 and rep["family"]["control"]["input"] == "img_in.weight"
    assert "control" not in (inspect(F / "flux_kohya.safetensors").report["family"] or {})


def test_a_control_lora_on_an_already_widened_base_adds_only(tmp_path):
    """Into the merged Canny-like model (x_embedder already 8 wide) the same file widens nothing: B@A is added,
    the norm scales are set again (idempotent), no widening warning, config untouched."""
    first = tmp_path / "first"
    merge(BASES["diffusers"], [str(CONTROL)], first)
    rep = merge(first, [str(CONTROL)], tmp_path / "second")
    assert not any("widened" in w for w in rep["warnings"])
    a = folder_weights(first)
    b = folder_weights(tmp_path / "second")
    t = load_file(CONTROL)
    dw = t["img_in.lora_B.weight"] @ t["img_in.lora_A.weight"]
    assert torch.allclose(b["x_embedder.weight"], a["x_embedder.weight"] + dw, atol=1e-6)
    assert torch.equal(b["transformer_blocks.0.attn.norm_q.weight"], a["transformer_blocks.0.attn.norm_q.weight"])
    assert json.loads((tmp_path / "second" / "transformer" / "config.json").read_text())["in_channels"] == 8


@pytest.mark.parametrize("route", ["together-diffusers", "together-bfl", "into-the-merged-model"])
def test_an_ordinary_lora_with_the_control_lora(route, tmp_path):
    """A style LoRA trained on Flux.1-dev's 4-wide x_embedder, merged with the control LoRA (one merge, either
    layout) or into the merged control model: its A is zero-padded to the widened input, as diffusers'
    _maybe_expand_lora_state_dict does; both equal FluxControlPipeline loading both and fusing them."""
    style = F / "flux_control_style.safetensors"
    layout = "bfl" if route.endswith("bfl") else "diffusers"
    out = tmp_path / ("o" if layout == "diffusers" else "o.safetensors")
    if route.startswith("together"):
        rep = merge(BASES[layout], [str(CONTROL), str(style)], out)
    else:
        merge(BASES["diffusers"], [str(CONTROL)], tmp_path / "control")
        rep = merge(tmp_path / "control", [str(style)], out)
        assert rep["adapters"] and inspect(style, base=tmp_path / "control").report["family"]["input_padded"]
    got = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors" if layout == "diffusers" else out)
    assert max_diff(got, _expected("control_style", layout)) <= 1e-5


def test_a_plan_that_cannot_write_new_columns_refuses_the_widening():
    """What the ONNX export / bake and validate plan with (widen=False): one line naming the tensor and the way
    out; the same adapter merges when the plan may widen."""
    from loraport.checkpoint import Checkpoint
    from loraport.engine.plan import build_plan
    from loraport.formats import load_adapter

    base = Checkpoint.open(BASES["diffusers"])
    ad = load_adapter(CONTROL, base=base)
    with pytest.raises(LoraportError, match="control LoRA.*widens transformer.x_embedder.weight from 4 to 8 input "
                                            "columns.*float safetensors base") as e:
        build_plan(base, [(ad, 1.0)])
    assert "\n" not in str(e.value)
    assert build_plan(base, [(ad, 1.0)], widen=True).shape_of("transformer.x_embedder.weight") == (16, 8)


def test_converting_a_control_lora_is_refused_in_one_line(tmp_path):
    """A widened input and replaced tensors have no place in a LoRA-only file: convert says so (exit 2) instead of
    writing a file that would lose them."""
    for to in ("kohya", "diffusers"):
        code, _, err = run_cli("convert", CONTROL, "--to", to, "--out", tmp_path / f"{to}.safetensors", "--base",
                               BASES["diffusers"])
        assert code == 2 and "control LoRA" in err and "merge it" in err and "Traceback" not in err, err
        assert not (tmp_path / f"{to}.safetensors").exists()


@pytest.mark.slow  # ~12 s importing bitsandbytes: pytest -m slow tests/test_dit_flux_control.py
def test_widening_is_refused_with_a_quantized_output(tmp_path):
    """A quantized output has no place for new columns: one line, exit 2, nothing written."""
    pytest.importorskip("bitsandbytes")
    with pytest.raises(LoraportError, match="control LoRA.*widens .*x_embedder.weight from 4 to 8.*quantize") as e:
        merge(BASES["diffusers"], [str(CONTROL)], tmp_path / "q", quantize="nf4")
    assert "\n" not in str(e.value) and not (tmp_path / "q").exists()
    code, _, err = run_cli("merge", "--base", BASES["diffusers"], "--adapter", CONTROL, "--out", tmp_path / "q2",
                           "--quantize", "int8")
    assert code == 2 and "widens" in err and "Traceback" not in err and not (tmp_path / "q2").exists()


def test_hostile_control_files_are_one_line(tmp_path):
    """A norm scale of the wrong size, an img_in LoRA narrower than the base and a non-float scale: refused in
    one line before a byte is written, the input unchanged."""
    t = load_file(CONTROL)
    cases = {
        "scale": {**t, "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(5)},
        "narrow": {**t, "img_in.lora_A.weight": t["img_in.lora_A.weight"][:, :3].contiguous()},
        "int": {**t, "single_blocks.1.norm.key_norm.scale": torch.ones(8, dtype=torch.int32)},
    }
    for name, tensors in cases.items():
        src = tmp_path / f"{name}.safetensors"
        save_file(tensors, src)
        before = src.read_bytes()
        with pytest.raises(LoraportError) as e:
            merge(BASES["diffusers"], [str(src)], tmp_path / f"o_{name}")
        assert "\n" not in str(e.value), name
        assert not (tmp_path / f"o_{name}").exists() and src.read_bytes() == before


@pytest.mark.slow  # ~30 s, most of it importing diffusers: pytest -m slow tests/test_dit_flux_control.py
def test_merged_control_model_runs_like_diffusers_unfused(tmp_path):
    """The merged diffusers folder loads in diffusers (in_channels 8, out_channels 4) and its forward on the
    widened input (noise latents + control latents) equals the base with the control LoRA loaded unfused by
    FluxControlPipeline, whose converter and expansion diffusers applies itself."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    ctl = maker("dit_flux_control")
    out = tmp_path / "o"
    merge(BASES["diffusers"], [str(CONTROL)], out)
    merged = diffusers.FluxTransformer2DModel.from_pretrained(out / "transformer").eval()
    assert merged.config.in_channels == 8 and merged.proj_out.out_features == 4

    ref = diffusers.FluxTransformer2DModel.from_pretrained(BASES["diffusers"] / "transformer").eval()
    h = ref.config.num_attention_heads * ref.config.attention_head_dim
    state = ctl.convert_by_probe(load_file(CONTROL), _convert_bfl_flux_control_lora_to_diffusers, "", h)
    # final_layer's A exactly as diffusers' converter permutes it would differ (formats/dit.md); the probe keeps
    # BFL's rule there, everything else is diffusers' loader and its expansion of x_embedder
    pipe = diffusers.FluxControlPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                         text_encoder_2=None, tokenizer_2=None, transformer=ref)
    pipe.load_lora_weights(state)
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 6, 3
    kw = dict(hidden_states=torch.randn(1, n_img, 8, generator=g),
              encoder_hidden_states=torch.randn(1, n_txt, ref.config.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, ref.config.pooled_projection_dim, generator=g),
              timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
              img_ids=torch.randn(n_img, 3, generator=g), txt_ids=torch.zeros(n_txt, 3))
    with torch.no_grad():
        want = ref(**kw).sample
        got = merged(**kw).sample
    assert got.shape == (1, n_img, 4)
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))
    shutil.rmtree(out)
