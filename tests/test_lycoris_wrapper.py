"""LyCORIS's whole-model wrapper (`lycoris.create_lycoris(module)`, SimpleTuner; keys `lycoris_<module path>.*`)
merged into every base it can come with: a diffusers DiT folder (Flux), an HF LLM folder (the wrapped
LlamaForCausalLM or its inner LlamaModel), a lone component folder, an original SD single file. The oracle is the
wrapped network's own forward in fp32 (fixtures/lycoris_wrapper/expect_*, made by fixtures/makers/
lycoris_wrapper.py with lycoris-lora): the merged model must reproduce it within 1e-5. Then inspect, convert
to/from the dialect (loaded back by PEFT and by lycoris-lora itself), and the refusals."""

from __future__ import annotations

import json

import logging
import shutil
from pathlib import Path

import pytest
import torch

import loraport
from _sd_util import apply_adapter, flat_state, load_pipeline, run_cli, save_single, sd_base, wrapped_module_errors
from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError, Inexpressible
from loraport.formats import detect, load_adapter
from loraport.safetensors_io import SafetensorsFile

FX = Path(__file__).resolve().parent.parent / "fixtures"
WRAP = FX / "lycoris_wrapper"
DIT = WRAP / "dit_base"
LLAMA = FX / "llm" / "bases" / "llama"
CASES = sorted(p.stem for p in WRAP.glob("*.safetensors") if not p.stem.startswith("expect_"))
TOL = 1e-5

logging.getLogger("lycoris").setLevel(logging.ERROR)


def _base_of(case: str) -> Path:
    return DIT if case.startswith("dit_") else LLAMA


def _run(case: str, model_dir: Path, expect: dict[str, torch.Tensor]) -> torch.Tensor:
    """The whole model at `model_dir` on the fixture's inputs."""
    if case.startswith("dit_"):
        from diffusers import FluxTransformer2DModel

        m = FluxTransformer2DModel.from_pretrained(model_dir / "transformer").eval()
        ins = {k: v for k, v in expect.items() if k != "sample"}
        with torch.no_grad():
            return m(**ins, return_dict=False)[0]
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return m(input_ids=expect["input_ids"]).logits


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def test_fixtures_cover_every_kind():
    assert {"llm_lora_dora", "llm_loha", "llm_lokr", "llm_inner_full", "dit_lokr", "dit_loha_dora",
            "dit_full"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_merge_reproduces_the_wrapped_forward(tmp_path, case):
    """loraport merge (the engine, the CLI's path) → the peer loads the merged folder → same output as the
    wrapped network, and visibly different from the base (so the check can fail)."""
    f = WRAP / f"{case}.safetensors"
    assert detect(f).name == "lycoris"
    expect = SafetensorsFile(WRAP / f"expect_{case}.safetensors").load_all()
    ref = expect["sample" if case.startswith("dit_") else "logits"]
    out = tmp_path / "merged"
    res = loraport.merge(_base_of(case), [f], out)
    assert res.report["tensors_updated"] > 10
    got = _run(case, out, expect)
    assert _rel(got, ref) <= TOL, case
    assert _rel(_run(case, _base_of(case), expect), ref) > 100 * TOL  # the adapter does change the output


def test_lone_component_folder(tmp_path):
    """The transformer/ folder alone (diffusers component, no model_index.json): the wrapper's names are its own
    tensor paths."""
    comp = tmp_path / "transformer"
    shutil.copytree(DIT / "transformer", comp)
    ad = load_adapter(WRAP / "dit_lokr.safetensors", base=Checkpoint.open(comp))
    whole = load_adapter(WRAP / "dit_lokr.safetensors", base=Checkpoint.open(DIT))
    assert sorted("transformer." + d.target for d in ad.deltas) == sorted(d.target for d in whole.deltas)
    assert any("whole model" in n for n in ad.notes)


def test_inspect_names_dialect_and_base():
    rep = loraport.inspect(WRAP / "llm_lokr.safetensors").to_dict()
    notes = " ".join(rep["notes"])
    assert "LyCORIS whole-model wrapper" in notes and "expects a base" in notes and "whole HF LLM" in notes
    assert rep["dtypes"] == {"float32": 15 * 3}  # LoKr factors are reported like LoRA's
    notes = " ".join(loraport.inspect(WRAP / "dit_lokr.safetensors").to_dict()["notes"])
    assert "look like a DiT transformer" in notes
    rep = loraport.inspect(WRAP / "llm_inner_full.safetensors", base=LLAMA).to_dict()
    assert any("under model.: the inner model" in n for n in rep["notes"])
    code, out, _ = run_cli("inspect", WRAP / "dit_loha_dora.safetensors", "--base", DIT)
    assert code == 0 and "LyCORIS whole-model wrapper" in out and "transformer of a diffusers DiT" in out
    assert "DoRA" in out


def test_wrong_base_is_refused(tmp_path):
    """An LLM wrapper file against the DiT folder: exit 2, one line naming the modules, no output."""
    out = tmp_path / "m"
    code, _, err = run_cli("merge", "--base", DIT, "--adapter", WRAP / "llm_loha.safetensors", "--out", out)
    assert code == 2 and "not in the base" in err and "lycoris_model_layers" in err
    assert "Traceback" not in err and not out.exists()


def test_stray_module_strict_and_lenient(tmp_path):
    """One module the base lacks: refused by default, skipped (and listed) with strict=False."""
    from safetensors.torch import load_file, save_file

    sd = load_file(WRAP / "llm_lokr.safetensors")
    sd["lycoris_model_layers_9_mlp_up_proj.diff"] = torch.zeros(48, 32)
    f = tmp_path / "stray.safetensors"
    save_file(sd, f)
    with pytest.raises(BadInputError, match="1 module.s. not in the base"):
        load_adapter(f, base=Checkpoint.open(LLAMA))
    ad = load_adapter(f, base=Checkpoint.open(LLAMA), strict=False)
    assert "lycoris_model_layers_9_mlp_up_proj.*" in ad.metadata["skipped"]


def test_tied_head_matches_lycoris_own_merge(tmp_path):
    """A base that ties lm_head to the embedding stores no lm_head.weight; the wrapper still names
    `lycoris_lm_head`. Merged, the shared tensor changes, exactly as LyCORIS's own merge_to leaves it (noted)."""
    lycoris = pytest.importorskip("lycoris")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in SafetensorsFile(tmp_path / "base" / "model.safetensors").tensors
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    net = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, algo="lora")
    net.apply_to()
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.normal_(0, 0.1)
    f = tmp_path / "wrap.safetensors"
    net.save_weights(str(f), torch.float32, None)
    assert any(k.startswith("lycoris_lm_head.") for k in SafetensorsFile(f).tensors)
    notes = loraport.inspect(f, base=tmp_path / "base").to_dict()["notes"]
    assert any("ties to its input embedding" in n for n in notes)
    net.merge_to(1.0)
    ref = model.state_dict()
    loraport.merge(tmp_path / "base", [f], tmp_path / "out")
    got = SafetensorsFile(tmp_path / "out" / "model.safetensors").load_all()
    assert max((got[k] - ref[k]).abs().max().item() for k in got) <= TOL * max(v.abs().max().item()
                                                                                for v in got.values())


# ------------------------------------------------------------------------------------------------ convert
def test_convert_to_peft_and_back_to_the_wrapper(tmp_path):
    """wrapper LoRA+DoRA → PEFT (PEFT loads it: same logits) → LyCORIS wrapper (lycoris-lora loads it with
    create_lycoris_from_weights: same logits)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    expect = SafetensorsFile(WRAP / "expect_llm_lora_dora.safetensors").load_all()
    ids = expect["input_ids"]
    rep = loraport.convert(WRAP / "llm_lora_dora.safetensors", "peft", tmp_path / "peft", base=LLAMA)
    assert rep.report["max_abs_diff"] <= 1e-6
    m = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLAMA), tmp_path / "peft").eval()
    with torch.no_grad():
        assert _rel(m(input_ids=ids).logits, expect["logits"]) <= TOL
    back = tmp_path / "wrap.safetensors"
    loraport.convert(tmp_path / "peft", "lycoris", back, base=LLAMA)  # an LLM base: the wrapper dialect
    keys = SafetensorsFile(back).tensors
    assert keys and all(k.startswith("lycoris_model_layers_") or k.startswith("lycoris_lm_head.") for k in keys)
    lycoris = pytest.importorskip("lycoris")
    model = AutoModelForCausalLM.from_pretrained(LLAMA).eval()
    net, _ = lycoris.create_lycoris_from_weights(1.0, str(back), model)
    assert len(net.loras) == len({k.split(".")[0] for k in keys})
    net.apply_to()
    with torch.no_grad():
        assert _rel(model(input_ids=ids).logits, expect["logits"]) <= TOL


def test_convert_within_lycoris_both_dialects(tmp_path):
    """DiT wrapper → the kohya dialect (BFL names, `lora_unet_…`): q, k, v's LoHas become one LoHa on the fused
    qkv (each in its own block of columns, rank 3r) and `norm_out.linear`'s rows are re-ordered into BFL's
    swapped `final_layer.adaLN_modulation.1`, DoRA magnitudes with them; full diffs and their bias diffs are
    stacked the same way; merged back into the diffusers folder the kohya file gives the wrapped network's output.
    A LoKr's rows have no Kronecker form on the fused tensor: refused with the tensor named (never written wrong)."""
    for case, key in (("dit_loha_dora", "final_layer_adaLN_modulation_1.dora_scale"),
                      ("dit_full", "double_blocks_0_img_attn_qkv.diff_b")):  # full: biases regrouped too
        k = tmp_path / f"{case}.safetensors"
        rep = loraport.convert(WRAP / f"{case}.safetensors", "lycoris", k, base=DIT, write_options={"names": "kohya"})
        assert rep.report["max_abs_diff"] <= 1e-5
        keys = SafetensorsFile(k).tensors
        assert "lora_unet_" + key in keys and not any(n.startswith("lycoris_") for n in keys)
        loraport.merge(DIT, [k], tmp_path / f"m_{case}")
        expect = SafetensorsFile(WRAP / f"expect_{case}.safetensors").load_all()
        assert _rel(_run("dit_", tmp_path / f"m_{case}", expect), expect["sample"]) <= TOL
    k2 = tmp_path / "lokr.safetensors"
    with pytest.raises(Inexpressible, match="lokr .*has no form on the fused tensor"):
        loraport.convert(WRAP / "dit_lokr.safetensors", "lycoris", k2, base=DIT, write_options={"names": "kohya"})
    assert not k2.exists()
    # without a base the wrapper's names are kept as they are
    loraport.convert(WRAP / "llm_lokr.safetensors", "lycoris", tmp_path / "nobase.safetensors")
    assert set(SafetensorsFile(tmp_path / "nobase.safetensors").tensors) == set(
        SafetensorsFile(WRAP / "llm_lokr.safetensors").tensors)


def test_inexpressible_conversions_are_refused(tmp_path):
    # LoHa has no PEFT *LoRA* form, but PEFT has its own LoHa method: the file becomes a PEFT LOHA adapter
    code, _, err = run_cli("convert", WRAP / "llm_loha.safetensors", "--to", "peft", "--out", tmp_path / "p",
                           "--base", LLAMA)
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] == "LOHA"
    # a wrapper file names one wrapped module: an SD file touching the UNet and the text encoder cannot be one
    with pytest.raises(BadInputError, match="outside the UNet"):
        loraport.convert(FX / "sd" / "lycoris_loha.safetensors", "lycoris", tmp_path / "w.safetensors",
                         base=FX / "sd" / "base", write_options={"names": "wrapper"})
    # wrapper names without a base are only meaningful against one
    with pytest.raises(BadInputError, match="needs (--)?base"):
        loraport.convert(WRAP / "llm_lokr.safetensors", "peft", tmp_path / "q")


# ------------------------------------------------------------------------------------------------ SD single file
@pytest.mark.parametrize("algo,kw,xl", [
    pytest.param("lokr", {"factor": 2}, False, id="sd1-lokr"),
    pytest.param("locon", {"dora_wd": True}, False, id="sd1-locon-dora"),
    pytest.param("loha", {}, True, id="sdxl-loha", marks=pytest.mark.slow),  # builds the tiny SDXL pipeline (~10 s)
])
def test_sd_single_file(tmp_path, algo, kw, xl):
    """The wrapper around a diffusers UNet merged into the original (LDM/SGM-named) single file: each layer's
    merged weight gives the wrapped module's own output."""
    lycoris = pytest.importorskip("lycoris")
    if xl:
        folder, single, _ = sd_base(xl=True)
        pipe = load_pipeline(folder, xl=True)
    else:
        pipe = load_pipeline(FX / "sd" / "base")
        single = tmp_path / "single.safetensors"
        save_single(flat_state(pipe), single, xl=False)
    torch.manual_seed(11)
    net = lycoris.create_lycoris(pipe.unet, 1.0, linear_dim=2, linear_alpha=1.0, algo=algo, **kw)
    net.apply_to()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p)) if "dora_scale" in n else p.normal_(0, 0.3)
    f = tmp_path / "wrap.safetensors"
    net.save_weights(str(f), torch.float32, None)
    ck = Checkpoint.open(single)
    ad = load_adapter(f, base=ck)
    assert any("under unet." in n for n in ad.notes)
    merged = apply_adapter(ad, ck)
    target = {d.source_key: d.target for d in ad.deltas}
    assert len(target) == len(net.loras) > 20
    assert all(t.startswith("model.diffusion_model.") for t in target.values())
    for name, err in wrapped_module_errors(net, merged, target).items():
        assert err <= TOL, name


def test_ambiguous_roots_are_refused():
    """Module paths that fit two components equally (SDXL's two CLIP text encoders) are refused, not guessed; the
    message names the way out (the component folder alone)."""
    from loraport.names.lycoris_wrapper import WrapperNames, wrapper_roots
    from loraport.names.sd import SDNames

    names = [f"{c}.text_model.encoder.layers.0.mlp.fc1.{p}" for c in ("text_encoder", "text_encoder_2")
             for p in ("weight", "bias")] + ["unet.add_embedding.linear_1.weight"]
    sd = SDNames(names)
    roots = wrapper_roots(sd, names, lambda n: False, tied=False)
    with pytest.raises(BadInputError, match="fit both .* text_encoder_2/"):
        WrapperNames(sd, roots, ["lycoris_text_model_encoder_layers_0_mlp_fc1"])
    one = WrapperNames(sd, roots, ["lycoris_add_embedding_linear_1"])  # only the UNet has it
    assert one.root.prefix == "unet." and one.by_kohya["lycoris_add_embedding_linear_1"]["weight"].target == names[-1]
