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
