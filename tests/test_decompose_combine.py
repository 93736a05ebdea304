"""`loraport combine` against PEFT's own `add_weighted_adapter` (cat, svd, ties_svd) on the same adapters,
and `cat` against merging both adapters.

PEFT's conventions, checked here rather than assumed: for "cat" it folds wᵢ·scaleᵢ into Aᵢ, concatenates,
and gives the new adapter alpha = r (scale 1), so its ΔW is exactly Σ wᵢ·ΔWᵢ; "svd" SVDs that same dense sum
and truncates to svd_rank (default: the largest input rank), B = U·σ, A = Vᵀ, alpha = r. Both copy the first
adapter's config, so when it uses rsLoRA the new scale is r/√r = √r and PEFT's result is √r × the weighted
sum; loraport always writes the plain weighted sum (test_peft_rslora_scales_cat_and_svd_by_sqrt_r). Its
"linear"/"ties"/"dare_*" (non-svd) variants mix A and B separately with √(wᵢ·scaleᵢ) each, which adds
cross terms Bᵢ·Aⱼ: not a weighted sum of updates, so not an oracle for anything loraport does.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from _decompose_util import cli, fp32_tol, peft_deltas, read_delta, tiny_llama


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Adapters a (r=8, alpha=16: q, v, up) and b (r=4, alpha=4: q, k, down) on one tiny Llama, saved, and
    PEFT's own weighted combinations of them."""
    from peft import LoraConfig, get_peft_model

    tmp = tmp_path_factory.mktemp("combine")
    base = tiny_llama(seed=0)
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "up_proj"]), adapter_name="first")
    torch.manual_seed(2)
    pm.add_adapter("second", LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                   target_modules=["q_proj", "k_proj", "down_proj"]))
    pm.save_pretrained(tmp / "ab")  # non-default adapters go to ab/first and ab/second
    oracle = {}
    pm.add_weighted_adapter(["first", "second"], [0.7, 0.3], "cat", combination_type="cat")
    pm.add_weighted_adapter(["first", "second"], [0.7, 0.3], "svd8", combination_type="svd")
    pm.add_weighted_adapter(["first", "second"], [0.7, 0.3], "svd3", combination_type="svd", svd_rank=3)
    pm.add_weighted_adapter(["first", "second"], [0.5, 0.5], "ties", combination_type="ties_svd", density=0.3)
    for name in ("first", "second", "cat", "svd8", "svd3", "ties"):
        oracle[name] = peft_deltas(pm, name)
    oracle["a"], oracle["b"] = oracle.pop("first"), oracle.pop("second")
    factors = {}
    for mname, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "cat" in mod.lora_A:
            factors[f"{mname}.weight"] = (mod.lora_A["cat"].weight.detach().clone(),
                                         mod.lora_B["cat"].weight.detach().clone())
    return tmp, base, oracle, factors


def _combine(two, tmp_path, method, *extra, weights="0.7,0.3"):
    tmp = two[0]
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / method
    r = cli("combine", tmp / "ab" / "first", tmp / "ab" / "second", "--weights", weights, "--method", method,
            "--out", out, "--json", *extra)
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_cat_is_exact_and_equals_peft_cat(two, tmp_path):
    from loraport.formats import load_adapter

    tmp, base, oracle, factors = two
    out, rep = _combine(two, tmp_path, "cat")
    assert rep["max_rel_error"] < 1e-6
    got = read_delta(out, base.state_dict())
    exact = {k: 0.7 * oracle["a"].get(k, 0) + 0.3 * oracle["b"].get(k, 0) for k in {*oracle["a"], *oracle["b"]}}
    assert set(got) == set(exact) == set(oracle["cat"])
    for k, d in exact.items():
        assert float((got[k] - d).abs().max()) <= fp32_tol(d, torch.zeros(1)), k
        assert float((got[k] - oracle["cat"][k]).abs().max()) <= fp32_tol(d, torch.zeros(1)), k
    # where both adapters touch a layer PEFT's factors are ours exactly (same layout: [wₐsₐAₐ; w_b s_b A_b])
    ours = {d.target: d for d in load_adapter(out).deltas}
    for k in set(oracle["a"]) & set(oracle["b"]):
        A, B = factors[k]
        assert torch.equal(ours[k].A, A) and torch.equal(ours[k].B, B), k
        assert ours[k].rank() == 12


def test_cat_equals_merging_both_adapters(two, tmp_path):
    """Base + combined (loaded and merged by PEFT itself) == base + 0.7·ΔWa + 0.3·ΔWb."""
    from peft import PeftModel

    tmp, base, oracle, _ = two
    out, _ = _combine(two, tmp_path, "cat")
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).merge_and_unload().state_dict()
    for k, W in base.state_dict().items():
        want = W + 0.7 * oracle["a"].get(k, torch.zeros_like(W)) + 0.3 * oracle["b"].get(k, torch.zeros_like(W))
        assert float((merged[k] - want).abs().max()) <= fp32_tol(want - W, W), k


@pytest.mark.parametrize("rank,key", [(None, "svd8"), (3, "svd3")])
def test_svd_equals_peft_svd(two, tmp_path, rank, key):
    tmp, base, oracle, _ = two
    out, rep = _combine(two, tmp_path, "svd", *(["--rank", rank] if rank else []))
    got = read_delta(out, base.state_dict())
    assert set(got) == set(oracle[key])
    for x in rep["layers"]:
        k = x["target"]
        ref = oracle[key][k]
        exact = 0.7 * oracle["a"].get(k, 0) + 0.3 * oracle["b"].get(k, 0)
        assert float((got[k] - ref).abs().max()) <= fp32_tol(exact, torch.zeros(1), ulps=16), k
        # the reported error is the true error against the exact weighted sum
        true = float(torch.linalg.vector_norm(got[k].double() - exact.double()) /
                     torch.linalg.vector_norm(exact.double()))
        assert x["rel_error"] == pytest.approx(true, rel=1e-3, abs=1e-6)
        assert x["rank_out"] == min(rank or 8, sum(x["rank_in"]))


def test_ties_equals_peft_ties_svd_with_equal_weights(two, tmp_path):
    tmp, base, oracle, _ = two
    out, rep = _combine(two, tmp_path, "ties", "--density", 0.3, weights="0.5,0.5")
    assert rep["density"] == 0.3
    got = read_delta(out, base.state_dict())
    for k, ref in oracle["ties"].items():
        assert float((got[k] - ref).abs().max()) <= fp32_tol(ref, torch.zeros(1), ulps=16), k
    for x in rep["layers"]:
        k = x["target"]
        exact = 0.5 * oracle["a"].get(k, 0) + 0.5 * oracle["b"].get(k, 0)
        true = float(torch.linalg.vector_norm(got[k].double() - exact.double()) /
                     torch.linalg.vector_norm(exact.double()))
        assert x["rel_error"] == pytest.approx(true, rel=1e-3)


def test_dare_is_seeded_and_density_one_is_svd(two, tmp_path):
    tmp, base, oracle, _ = two
    out1, rep1 = _combine(two, tmp_path / "1", "dare", "--density", 0.5, "--seed", 7)
    out2, rep2 = _combine(two, tmp_path / "2", "dare", "--density", 0.5, "--seed", 7)
    out3, _ = _combine(two, tmp_path / "3", "dare", "--density", 0.5, "--seed", 8)
    assert rep1["seed"] == 7 and rep1["density"] == 0.5
    g1, g2, g3 = (read_delta(o, base.state_dict()) for o in (out1, out2, out3))
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert any(not torch.equal(g1[k], g3[k]) for k in g1)
    assert rep1["max_rel_error"] > 0.05  # dropping half the entries is visible in the error report
    out4, rep4 = _combine(two, tmp_path / "4", "dare", "--density", 1.0)
    g4 = read_delta(out4, base.state_dict())
    for k, ref in oracle["svd8"].items():
        assert float((g4[k] - ref).abs().max()) <= fp32_tol(ref, torch.zeros(1), ulps=16), k


def test_peft_rslora_scales_cat_and_svd_by_sqrt_r(tmp_path):
    """PEFT copies use_rslora into the combined config, so its cat/svd result is √r_new × Σ wᵢ·ΔWᵢ; ours is
    the weighted sum itself."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=0)
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                        target_modules=["q_proj"]), adapter_name="x")
    torch.manual_seed(2)
    pm.add_adapter("y", LoraConfig(r=4, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                   target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "xy")
    pm.add_weighted_adapter(["x", "y"], [0.7, 0.3], "cat", combination_type="cat")
    dx, dy, dcat = peft_deltas(pm, "x"), peft_deltas(pm, "y"), peft_deltas(pm, "cat")
    r = cli("combine", tmp_path / "xy" / "x", tmp_path / "xy" / "y", "--weights", "0.7,0.3", "--method", "cat",
            "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    got = read_delta(tmp_path / "c", base.state_dict())
    for k in dcat:
        exact = 0.7 * dx[k] + 0.3 * dy[k]
        assert float((got[k] - exact).abs().max()) <= fp32_tol(exact, torch.zeros(1)), k
        torch.testing.assert_close(dcat[k], math.sqrt(12) * exact, rtol=1e-5, atol=1e-5)


def test_combine_bad_input(two, tmp_path):
    tmp = two[0]
    a, b = tmp / "ab" / "first", tmp / "ab" / "second"
    cases = [
        ([a, b, "--weights", "0.7"], "1 --weights value(s) for 2 adapter(s)"),
        ([a, b, "--weights", "x,y"], "comma-separated"),
        ([a, b, "--method", "cat", "--rank", 4], "exact"),
        ([a, b, "--method", "ties", "--density", 0], "(0, 1]"),
        ([a], "at least two"),
        ([a, tmp_path / "nope"], "not found"),
    ]
    for args, msg in cases:
        r = cli("combine", *args, "--out", tmp_path / "x")
        assert r.exit_code == 2 and msg in r.stderr and "Traceback" not in r.output, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()
