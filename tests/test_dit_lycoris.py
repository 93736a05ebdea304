"""LyCORIS on diffusion transformers' ORIGINAL single files, and ComfyUI's generic keys (issue #17).

* The whole-model wrapper (`lycoris.create_lycoris(transformer)`, SimpleTuner; keys `lycoris_<diffusers path>`)
  made by lycoris-lora on the micro Flux / SD3 / Wan / Qwen-Image transformers of fixtures/dit, algos lora,
  loha, lokr, full, with and without DoRA, merged into the family's original single file (BFL, SAI, Wan-AI,
  ComfyUI's `model.diffusion_model.`): fused targets (Flux qkv / linear1, SD3 qkv) take each module's rows,
  Flux's and SD3's swapped adaLN halves are re-ordered. Oracle: diffusers' own single-file converter brings the
  merged file back to diffusers names, and each wrapped layer's merged weight must reproduce the wrapped
  module's forward (`_sd_util.wrapped_module_errors`); for the committed Flux fixtures the whole transformer's
  output too.
* ComfyUI's generic keys (`diffusion_model.<module of the model file>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`, and LyCORIS tensors under the same names; comfy/lora.py maps every base tensor so) merge exactly as
  the kohya spelling of the same file, which the family tests check against diffusers.
* A LyCORIS wrapper around a Qwen2 LLM (biased q/k/v: a full diff's `diff_b`).

Cost: the default cases take a few seconds; `pytest -m slow tests/test_dit_lycoris.py` runs every family x algo.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _sd_util import wrapped_module_errors
from loraport.api import inspect, merge
from loraport.errors import BadInputError
from loraport.safetensors_io import SafetensorsFile
from tests._dit_util import maker

FX = Path(__file__).resolve().parents[1] / "fixtures"
F = FX / "dit"
TOL = 1e-5
COMFY = "model.diffusion_model."

logging.getLogger("lycoris").setLevel(logging.ERROR)


def _flux_back(sd):
    return maker("dit").bfl_to_diffusers(sd)


def _sd3_back(sd):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    return convert_sd3_transformer_checkpoint_to_diffusers(sd)


def _wan_back(sd):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    return convert_wan_transformer_to_diffusers(sd)


# family → (diffusers folder, transformer class, original single file (None: the folder's names under ComfyUI's
# prefix, Qwen-Image's single file), diffusers' converter from the original names)
FAMILIES = {
    "flux": ("flux-diffusers", "FluxTransformer2DModel", "flux-bfl.safetensors", _flux_back),
    "sd3": ("sd3-diffusers", "SD3Transformer2DModel", "sd3-original.safetensors", _sd3_back),
    "wan": ("wan-diffusers", "WanTransformer3DModel", "wan-original.safetensors", _wan_back),
    "qwen": ("qwen-diffusers", "QwenImageTransformer2DModel", None, lambda sd: sd),
}
ALGOS = {"lora": {"algo": "lora"}, "lora_dora": {"algo": "lora", "dora_wd": True}, "loha": {"algo": "loha"},
         "loha_dora": {"algo": "loha", "dora_wd": True}, "lokr": {"algo": "lokr", "factor": 2},
         "lokr_dora": {"algo": "lokr", "factor": 2, "dora_wd": True}, "full": {"algo": "full"}}
# the default run: every family and kind once, the fused and swapped targets with DoRA (Flux: LoKr rows of qkv,
# linear1 and the swapped norm_out; SD3: LoHa rows of qkv and both swapped modulations; Wan: a Conv3d); the rest
# is slow
DEFAULT = {("flux", "lokr_dora"), ("sd3", "loha_dora"), ("wan", "lora_dora"), ("qwen", "full")}
CASES = [pytest.param(f, a, id=f"{f}-{a}", marks=() if (f, a) in DEFAULT else pytest.mark.slow)
         for f in FAMILIES for a in ALGOS]


def _single(fam: str, tmp: Path) -> tuple[Path, str]:
    """(the original single file, the prefix its names carry)."""
    folder, _, single, _ = FAMILIES[fam]
    if single is not None:
        return F / single, ""
    p = tmp / f"{fam}-single.safetensors"
    sd = load_file(F / folder / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file({COMFY + k: v for k, v in sd.items()}, p)
    return p, COMFY


def _wrapper(fam: str, kw: dict, dst: Path):
    """lycoris-lora's wrapper around the family's micro transformer, random factors, saved as SimpleTuner does;
    (the network, lora name → the wrapped layer's diffusers weight name)."""
    lycoris = pytest.importorskip("lycoris")
    import diffusers

    folder, cls, _, _ = FAMILIES[fam]
    model = getattr(diffusers, cls).from_pretrained(F / folder / "transformer").eval()
    paths = {id(m): n for n, m in model.named_modules()}
    torch.manual_seed(5)
    net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, **kw)
    net.apply_to()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p)) if "dora_scale" in n else p.normal_(0, 0.1)
    net.save_weights(str(dst), torch.float32, None)
    return net, {lo.lora_name: paths[id(lo.org_module[0])] + ".weight" for lo in net.loras}


@pytest.mark.parametrize("fam,algo", CASES)
def test_wrapper_merges_into_the_original_single_file(fam, algo, tmp_path):
    f = tmp_path / "wrap.safetensors"
    net, target = _wrapper(fam, ALGOS[algo], f)
    single, prefix = _single(fam, tmp_path)
    rep = inspect(f, base=single).report
    assert rep["family"]["family"] == fam and rep["family"]["dialects"] == ["lycoris"]
    out = tmp_path / "merged.safetensors"
    merge(single, [str(f)], out)
    merged = {k.removeprefix(prefix): v for k, v in load_file(out).items()}
    base = {k.removeprefix(prefix): v for k, v in load_file(single).items()}
    assert set(merged) == set(base)
    back = FAMILIES[fam][3]
    errs = wrapped_module_errors(net, back(merged), target)
    assert len(errs) == len(net.loras) > 20
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, (worst, errs[worst])
    # the check can fail: the base's own weights miss the wrapped forward by far
    assert max(wrapped_module_errors(net, back(base), target).values()) > 100 * TOL


def test_input_axis_dora_on_the_swapped_norm_out_is_refused_for_the_original(tmp_path):
    """Input-axis DoRA (LyCORIS < 3.2's dora_scale [1, in]) normalises each column over all of norm_out.linear's
    rows; BFL's tensor holds them in another order, which is fine, but the update is placed half by half, and a
    half has no DoRA of its own: refused in one line naming the diffusers folder, nothing written. The diffusers
    folder takes it as it is."""
    g = torch.Generator().manual_seed(3)
    mod = "lycoris_norm_out_linear."
    f = {mod + k: torch.randn(*s, generator=g) * 0.2 for k, s in
         (("hada_w1_a", (32, 2)), ("hada_w1_b", (2, 16)), ("hada_w2_a", (32, 2)), ("hada_w2_b", (2, 16)))}
    f[mod + "alpha"] = torch.tensor(2.0)
    f[mod + "dora_scale"] = torch.rand(1, 16, generator=g) + 0.5
    p = tmp_path / "dora.safetensors"
    save_file(f, p)
    out = tmp_path / "o.safetensors"
    with pytest.raises(BadInputError, match="norm_out_linear.*cannot be split.*DoRA.*diffusers folder") as e:
        merge(F / "flux-bfl.safetensors", [str(p)], out)
    assert "\n" not in str(e.value) and not out.exists()
    merge(F / "flux-diffusers", [str(p)], tmp_path / "d")


# ------------------------------------------------------------------------------------------------ committed Flux
@pytest.mark.parametrize("case", [pytest.param("dit_lokr", marks=pytest.mark.slow), "dit_loha_dora", "dit_full"])
def test_committed_flux_wrappers_give_the_wrapped_output_from_the_bfl_file(case, tmp_path):
    """fixtures/lycoris_wrapper (made by lycoris-lora, no lycoris needed here) merged into the BFL file of their
    base: the merged file, read back by diffusers' converter, runs the transformer's whole forward as the wrapped
    network did."""
    from diffusers import FluxTransformer2DModel

    wrap = FX / "lycoris_wrapper"
    folder = wrap / "dit_base" / "transformer"
    cfg = FluxTransformer2DModel.load_config(folder)
    bfl = tmp_path / "bfl.safetensors"
    base = maker("dit").to_bfl(load_file(folder / "diffusion_pytorch_model.safetensors"), cfg["num_layers"],
                                cfg["num_single_layers"])
    save_file(base, bfl)
    merge(bfl, [str(wrap / f"{case}.safetensors")], tmp_path / "m.safetensors")
    expect = SafetensorsFile(wrap / f"expect_{case}.safetensors").load_all()
    ins = {k: v for k, v in expect.items() if k != "sample"}

    def run(sd):
        m = FluxTransformer2DModel.from_config(cfg).eval()
        m.load_state_dict(_flux_back(sd))
        with torch.no_grad():
            return m(**ins, return_dict=False)[0]

    ref = expect["sample"]
    rel = lambda got: ((got - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert rel(run(load_file(tmp_path / "m.safetensors"))) <= TOL
    assert rel(run(base)) > 100 * TOL


# ------------------------------------------------------------------------------------------------ ComfyUI keys
COMFY_CASES = {  # kohya-spelled fixture → its family's original single file (None: Qwen's, made by _single)
    "flux_kohya": "flux", "wan_musubi": "wan", "qwen_musubi": "qwen"}


def _comfy_keys(src: dict[str, torch.Tensor], base_names) -> dict[str, torch.Tensor]:
    """The same tensors under ComfyUI's generic key: `diffusion_model.` + the model file's module path (comfy/lora.py
    maps `lora_unet_<path with _>` and `diffusion_model.<path>` to the same base tensor)."""
    mods = {"lora_unet_" + n[:-len(".weight")].replace(".", "_"): n[:-len(".weight")] for n in base_names
            if n.endswith(".weight")}
    out = {}
    for k, v in src.items():
        mod, _, suffix = k.partition(".")
        out[f"diffusion_model.{mods[mod]}.{suffix}"] = v
    return out


@pytest.mark.parametrize("lora", list(COMFY_CASES))
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_comfy_generic_keys_merge_as_the_kohya_spelling(lora, layout, tmp_path):
    fam = COMFY_CASES[lora]
    single, prefix = _single(fam, tmp_path)
    names = [n.removeprefix(prefix) for n in SafetensorsFile(single).tensors]
    src = load_file(F / f"{lora}.safetensors")
    comfy = tmp_path / "comfy.safetensors"
    save_file(_comfy_keys(src, names), comfy)
    assert any(k.endswith(".lora_down.weight") for k in load_file(comfy))
    assert inspect(comfy).report["family"]["dialects"] == ["comfy"]
    base = single if layout == "original" else F / FAMILIES[fam][0]
    suffix = ".safetensors" if layout == "original" else ""
    merge(base, [str(F / f"{lora}.safetensors")], tmp_path / f"k{suffix}")
    merge(base, [str(comfy)], tmp_path / f"c{suffix}")
    pick = (lambda p: load_file(p)) if layout == "original" else (
        lambda p: load_file(p / "transformer" / "diffusion_pytorch_model.safetensors"))
    want, got, b = pick(tmp_path / f"k{suffix}"), pick(tmp_path / f"c{suffix}"), pick(base)
    assert sum(not torch.equal(want[k], b[k]) for k in b) >= 5
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_kohya_names_with_peft_factor_names(tmp_path):
    """`lora_unet_<module>.lora_A.weight` / `.lora_B.weight` (kohya names, PEFT's factor names: A1111 and ComfyUI
    accept the mix) merge as lora_down / lora_up."""
    src = load_file(F / "flux_kohya.safetensors")
    mixed = {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v
             for k, v in src.items()}
    save_file(mixed, tmp_path / "mixed.safetensors")
    merge(F / "flux-bfl.safetensors", [str(F / "flux_kohya.safetensors")], tmp_path / "k.safetensors")
    merge(F / "flux-bfl.safetensors", [str(tmp_path / "mixed.safetensors")], tmp_path / "m.safetensors")
    want, got = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_comfy_generic_keys_carry_lycoris_tensors(tmp_path):
    """A LoKr and a LoHa under `diffusion_model.` keys (ComfyUI reads every LyCORIS tensor under the generic key)
    merge into the BFL file as their `lora_unet_` spelling does."""
    g = torch.Generator().manual_seed(1)
    mods = {"double_blocks.0.img_attn.qkv": {"lokr_w1": (4, 2), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 8)},
            "single_blocks.1.linear2": {"hada_w1_a": (16, 2), "hada_w1_b": (2, 80), "hada_w2_a": (16, 2),
                                        "hada_w2_b": (2, 80)}}
    kohya, comfy = {}, {}
    for mod, parts in mods.items():
        for k, s in {**parts, "alpha": ()}.items():
            t = torch.tensor(1.0) if k == "alpha" else torch.randn(*s, generator=g) * 0.2
            kohya[f"lora_unet_{mod.replace('.', '_')}.{k}"] = t
            comfy[f"diffusion_model.{mod}.{k}"] = t
    for name, sd in (("k", kohya), ("c", comfy)):
        save_file(sd, tmp_path / f"{name}.safetensors")
        merge(F / "flux-bfl.safetensors", [str(tmp_path / f"{name}.safetensors")], tmp_path / f"{name}-m.safetensors")
    want, got = load_file(tmp_path / "k-m.safetensors"), load_file(tmp_path / "c-m.safetensors")
    base = load_file(F / "flux-bfl.safetensors")
    assert not torch.equal(want["double_blocks.0.img_attn.qkv.weight"], base["double_blocks.0.img_attn.qkv.weight"])
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------ LLM
@pytest.mark.parametrize("algo", [
    "full", *[pytest.param(a, marks=pytest.mark.slow) for a in ("loha_dora", "lokr", "lora_dora")]])
def test_wrapper_around_a_qwen2_llm(algo, tmp_path):
    """The wrapper around a tiny Qwen2ForCausalLM (q/k/v carry biases: a full diff updates them through
    `diff_b`) merged into its HF folder: the merged model's logits are the wrapped network's."""
    lycoris = pytest.importorskip("lycoris")
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    kw = {k: v for k, v in ALGOS[algo].items() if k != "factor"}
    net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, **kw)
    net.apply_to()
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p)) if "dora_scale" in n else p.normal_(0, 0.05)
        ref = model(input_ids=ids).logits
    f = tmp_path / "wrap.safetensors"
    net.save_weights(str(f), torch.float32, None)
    if algo == "full":
        assert any(k.endswith(".diff_b") for k in SafetensorsFile(f).tensors)
    merge(tmp_path / "base", [str(f)], tmp_path / "out")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(input_ids=ids).logits
    rel = lambda x: ((x - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert rel(got) <= TOL and rel(plain) > 100 * TOL
