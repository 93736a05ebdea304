"""PEFT's own methods besides LoRA (issue #18): LoHa, LoKr, IA³, VeRA, AdaLoRA, OFT, BOFT, MiSS and Bone, each made
here by live PEFT on the committed tiny Llama (fixtures/peft/bases/llama, built with transformers' own classes)
with random-initialised trainable parameters, saved with `save_pretrained`, merged by loraport, and compared with
PEFT's `merge_and_unload()` of the same model: every tensor within 1e-5 (fp32), and the merged folder loaded
with `from_pretrained` gives PEFT's logits. Methods that are no weight update are refused with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from _peft_util import cli, forward, fx, load_state, max_abs, sample_input

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import loraport  # noqa: E402
from loraport.errors import LoraportError  # noqa: E402

FP32_TOL = 1e-5
BASE = fx("bases", "llama")
ATTN_MLP = ["q_proj", "v_proj", "down_proj", "gate_proj"]


def _bone_from_miss(src: Path, dst: Path) -> None:
    """Bone is MiSS's former name (PEFT ≤ 0.16: peft_type BONE, `bone_block`); same math, renamed keys."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["peft_type"] = "BONE"
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "adapter_model.safetensors"))
    save_file({k.replace("miss_block", "bone_block"): v for k, v in sd.items()}, str(dst / "adapter_model.safetensors"))


def _configs() -> dict:
    p = peft
    return {
        "loha": p.LoHaConfig(r=4, alpha=6, target_modules=ATTN_MLP, rank_pattern={"v_proj": 2},
                             alpha_pattern={"down_proj": 3}, init_weights=False),
        "lokr_full": p.LoKrConfig(r=4, alpha=8, target_modules=ATTN_MLP, init_weights=False),
        "lokr_decomposed": p.LoKrConfig(r=2, alpha=3, target_modules=ATTN_MLP, decompose_both=True,
                                        decompose_factor=4, init_weights=False),
        "ia3": p.IA3Config(target_modules=ATTN_MLP, feedforward_modules=["down_proj"], init_ia3_weights=False),
        "vera": p.VeraConfig(r=4, target_modules=ATTN_MLP, save_projection=True, init_weights=False),
        "adalora": p.AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, target_modules=ATTN_MLP,
                                   init_lora_weights=False),
        "oft_neumann": p.OFTConfig(oft_block_size=8, r=0, target_modules=ATTN_MLP, init_weights=False),
        "oft_cayley_coft_shared": p.OFTConfig(oft_block_size=4, r=0, target_modules=ATTN_MLP, use_cayley_neumann=False,
                                              coft=True, eps=1e-2, block_share=True, init_weights=False),
        "boft": p.BOFTConfig(boft_block_size=8, target_modules=ATTN_MLP, init_weights=False),
        "miss": p.MissConfig(r=5, target_modules=ATTN_MLP, init_weights=False),
        "miss_bat": p.MissConfig(r=4, target_modules=ATTN_MLP, init_weights="bat"),
        "miss_mini": p.MissConfig(r=4, mini_r=8, target_modules=ATTN_MLP, init_weights="mini"),
    }


CASES = [*_configs(), "bone"]


def _randomise(model, case: str) -> None:
    """Trainable parameters off their identity init where PEFT's init_weights=False leaves them at it."""
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if prm.requires_grad and any(k in n for k in ("miss_block", "lora_E", "lora_B", "vera_lambda")):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def made(base_model, tmp_path_factory):
    """case -> (adapter folder, PEFT's merged state dict, PEFT's merged logits); made once per module."""
    root = tmp_path_factory.mktemp("peft_methods")
    x = sample_input(BASE)
    out = {}
    cfgs = _configs()
    for case, cfg in cfgs.items():
        torch.manual_seed(0)
        pm = peft.get_peft_model(copy.deepcopy(base_model), cfg)
        _randomise(pm, case)
        pm.save_pretrained(str(root / case))
        merged = pm.merge_and_unload().eval()
        out[case] = (root / case, {k: v.detach().clone() for k, v in merged.state_dict().items()}, forward(merged, x))
    _bone_from_miss(root / "miss", root / "bone")
    out["bone"] = (root / "bone", out["miss"][1], out["miss"][2])
    return out


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_peft_merge_and_unload(case, made, base_model, tmp_path):
    adapter, want, want_logits = made[case]
    out = tmp_path / "merged"
    loraport.merge(BASE, adapter, out, manifest=False)
    got = load_state(out)
    base_sd = base_model.state_dict()
    changed = 0
    for k, w in want.items():
        if k == "lm_head.weight" and k not in got:
            continue
        assert k in got, f"{case}: {k} missing from the merged output"
        d = max_abs(got[k], w)
        assert d <= FP32_TOL, f"{case} {k}: max abs diff {d:.3g} from PEFT > {FP32_TOL}"
        changed += max_abs(w, base_sd[k]) > 1e-4
    assert changed >= 8, f"{case}: PEFT's merge changed only {changed} tensors: the adapter proves nothing"
    from transformers import AutoModelForCausalLM

    logits = forward(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), sample_input(BASE))
    assert max_abs(logits, want_logits) <= 1e-4


@pytest.mark.parametrize("case", ["adalora", "vera"])
def test_converts_to_peft_lora_exactly(case, made, tmp_path):
    """AdaLoRA is a LoRA with E folded into A and scale alpha/(init_r + 1e-5); VeRA is one once the base gives
    each layer's input width (so its convert needs --base, and without it is refused): PEFT LoRA stores both
    exactly, and PEFT's merge of the converted LoRA equals its merge of the original."""
    adapter, want, _ = made[case]
    if case == "vera":
        with pytest.raises(LoraportError, match="no PEFT LoRA form"):
            loraport.convert(adapter, "peft", tmp_path / "nobase")
    loraport.convert(adapter, "peft", tmp_path / "lora", base=BASE if case == "vera" else None)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    from transformers import AutoModelForCausalLM

    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(BASE)), str(tmp_path / "lora"))
    got = merged.merge_and_unload().state_dict()
    assert max(max_abs(got[k], w) for k, w in want.items()) <= FP32_TOL


def _make(cfg, base_model, where: Path) -> Path:
    torch.manual_seed(0)
    peft.get_peft_model(copy.deepcopy(base_model), cfg).save_pretrained(str(where))
    return where


def _refused(adapter: Path, tmp_path: Path, *words: str, **kw) -> str:
    out = tmp_path / "out"
    with pytest.raises(LoraportError) as e:
        loraport.merge(BASE, adapter, out, manifest=False, **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not out.exists()
    return msg


@pytest.mark.parametrize("kind", ["prompt", "prefix", "p_tuning"])
def test_prompt_methods_refused_with_reason(kind, base_model, tmp_path):
    cfg = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig,
           "p_tuning": peft.PromptEncoderConfig}[kind](task_type="CAUSAL_LM", num_virtual_tokens=4)
    adapter = _make(cfg, base_model, tmp_path / kind)
    _refused(adapter, tmp_path, "cannot be merged into weights", "not a weight update")


def test_xlora_refused_with_reason(tmp_path):
    """X-LoRA's classifier picks LoRA experts per token (config written here; PEFT needs the expert adapters)."""
    ad = tmp_path / "xlora"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "XLORA", "adapters": {"0": "a"}}))
    _refused(ad, tmp_path, "X-LoRA", "no single weight update")


def test_unsupported_method_named(base_model, tmp_path):
    adapter = _make(peft.FourierFTConfig(n_frequency=8, target_modules=["q_proj"]), base_model, tmp_path / "ff")
    _refused(adapter, tmp_path, "FOURIERFT", "not supported yet", "LOHA")


def test_vera_without_saved_projections(base_model, tmp_path):
    """save_projection=False: PEFT redraws vera_A / vera_B from projection_prng_key on load; loraport redraws them
    the same way, sized by the base's largest targeted layer, and merges as PEFT's reloaded model does. Without a
    base (convert) it cannot size them and refuses, naming both ways out."""
    cfg = peft.VeraConfig(r=4, target_modules=ATTN_MLP, save_projection=False, projection_prng_key=7,
                          init_weights=False)
    adapter = _make(cfg, base_model, tmp_path / "vera")
    from safetensors.torch import load_file

    assert not any("vera_A" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter))
    with torch.no_grad():  # lambdas off PEFT's init so the update is not trivially small
        for n, prm in reloaded.named_parameters():
            if "vera_lambda" in n:
                prm.copy_(torch.randn(prm.shape, generator=torch.Generator().manual_seed(len(n))))
    reloaded.save_pretrained(str(tmp_path / "vera2"))
    want = reloaded.merge_and_unload().state_dict()
    loraport.merge(BASE, tmp_path / "vera2", tmp_path / "out", manifest=False)
    got = load_state(tmp_path / "out")
    assert max(max_abs(got[k], w) for k, w in want.items()) <= FP32_TOL
    assert sum(max_abs(w, base_model.state_dict()[k]) > 1e-4 for k, w in want.items()) >= 8
    with pytest.raises(LoraportError, match="save_projection=True"):
        loraport.convert(tmp_path / "vera2", "peft", tmp_path / "nobase")


def test_boft_butterfly_factor_refused(made, tmp_path):
    """boft_n_butterfly_factor > 1 (made on CUDA by PEFT; built here by stacking boft_R) is refused, not merged
    as if block-diagonal."""
    from safetensors.torch import load_file, save_file

    src = made["boft"][0]
    ad = tmp_path / "boft2"
    ad.mkdir()
    (ad / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    sd = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v]) if k.endswith("boft_R") else v for k, v in sd.items()},
              str(ad / "adapter_model.safetensors"))
    _refused(ad, tmp_path, "butterfly", "not supported")


def test_tampered_factors_refused(made, tmp_path):
    """A LoHa missing a factor, LoHa / LoKr factors whose inner sizes disagree (they would fail inside a matmul)
    and a VeRA vector of the wrong size: one-line errors, no output, inputs intact."""
    from safetensors.torch import load_file, save_file

    for n, (case, edit, words) in enumerate((
        ("loha", lambda k, v: None if k.endswith("layers.1.self_attn.v_proj.hada_w2_b") else v, ("lacks", "hada_w2_b")),
        ("loha", lambda k, v: v[:, :-1].contiguous() if k.endswith("layers.0.self_attn.q_proj.hada_w1_a") else v,
         ("hada_w1_a", "does not fit")),
        ("lokr_decomposed", lambda k, v: v[:-1] if k.endswith("layers.1.mlp.down_proj.lokr_w2_b") else v,
         ("lokr_w2_a", "does not fit")),
        ("vera", lambda k, v: v[:-1] if k.endswith("layers.0.self_attn.q_proj.vera_lambda_b") else v,
         ("q_proj", "shape mismatch")),
    )):
        src = made[case][0]
        ad = tmp_path / f"bad_{n}_{case}"
        ad.mkdir()
        (ad / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        sd = {k: e for k, v in load_file(str(src / "adapter_model.safetensors")).items()
              if (e := edit(k, v)) is not None}
        save_file(sd, str(ad / "adapter_model.safetensors"))
        before = (ad / "adapter_model.safetensors").read_bytes()
        _refused(ad, tmp_path, *words)
        assert (ad / "adapter_model.safetensors").read_bytes() == before


def test_activated_lora_refused_unless_forced(base_model, tmp_path):
    """aLoRA acts from its invocation tokens on; merging makes it act on every token: refused (exit 2, one line,
    naming --force), merged with --force and a warning, equal to PEFT's own merge of the same LoRA weights."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6],
                          task_type="CAUSAL_LM", init_lora_weights=False)
    adapter = _make(cfg, base_model, tmp_path / "alora")
    res = cli("merge", "--base", BASE, "--adapter", adapter, "--out", tmp_path / "refused")
    assert res.exit_code == 2 and "invocation" in res.stderr and "--force" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "refused").exists()
    res = cli("merge", "--base", BASE, "--adapter", adapter, "--out", tmp_path / "forced", "--force", "--json")
    assert res.exit_code == 0, res.stderr
    assert any("behaves differently" in w for w in json.loads(res.stdout)["warnings"])
    got = load_state(tmp_path / "forced")
    w = base_model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    sd = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter)).base_model.model.state_dict()
    A = sd["model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    B = sd["model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert max_abs(got["model.layers.0.self_attn.q_proj.weight"], w + 2.0 * B @ A) <= FP32_TOL
    assert max_abs(B, torch.zeros_like(B)) > 0


CONV_BASE = fx("bases", "conv", "model.safetensors")
CONV_TARGETS = ["conv1", "conv2", "proj", "head"]
CONV_CASES = {
    "loha": dict(kind="LoHaConfig", r=2, alpha=3),
    "loha_tucker": dict(kind="LoHaConfig", r=2, alpha=3, use_effective_conv2d=True),
    "lokr": dict(kind="LoKrConfig", r=2, alpha=3),
    "lokr_tucker": dict(kind="LoKrConfig", r=1, alpha=3, use_effective_conv2d=True, decompose_both=True),
    "ia3": dict(kind="IA3Config", feedforward_modules=["conv2"]),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_targets_equal_peft(case, tmp_path):
    """LoHa / LoKr (with and without the Tucker core of use_effective_conv2d) and IA³ (conv scale [1, n, 1, 1],
    input side for feedforward_modules, bias scaled otherwise) on the 3x3 / 1x1 convs and the linear head of a
    tiny conv net, single-file base."""
    from _peft_util import load_base_model

    opts = dict(CONV_CASES[case])
    kind = opts.pop("kind")
    init = {"init_ia3_weights": False} if kind == "IA3Config" else {"init_weights": False}
    model = load_base_model(CONV_BASE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, getattr(peft, kind)(target_modules=CONV_TARGETS, **opts, **init))
    pm.save_pretrained(str(tmp_path / "a"))
    want = pm.merge_and_unload().state_dict()
    loraport.merge(CONV_BASE, tmp_path / "a", tmp_path / "out.safetensors", manifest=False)
    got = load_state(tmp_path / "out.safetensors")
    assert max(max_abs(got[k], w) for k, w in want.items()) <= FP32_TOL
    assert sum(max_abs(w, before[k]) > 1e-4 for k, w in want.items()) >= 4


@pytest.mark.parametrize("case", ["loha", "lokr_full", "lokr_decomposed"])
def test_loha_lokr_convert_to_peft_and_load_in_peft(case, made, base_model, tmp_path):
    """LoHa / LoKr written back in PEFT's own form (the config makes PEFT rebuild the stored factor shapes:
    rank/alpha patterns, decompose_both, decompose_factor): PEFT loads it and its merge equals the original's."""
    adapter, want, _ = made[case]
    loraport.convert(adapter, "peft", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("LOHA" if case == "loha" else "LOKR")
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "out")).merge_and_unload()
    got = merged.state_dict()
    assert max(max_abs(got[k], w) for k, w in want.items()) <= FP32_TOL
