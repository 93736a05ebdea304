"""The LLM name tables (loraport/names/llm.py) walked by `translate`: every row round-trips through every pair
of its spellings, so a typo in a table fails here rather than as a mis-named tensor in a converted adapter."""

from __future__ import annotations

import itertools

import pytest

from loraport.names.llm import (
    BLOCK_PREFIX,
    EXPERTS,
    TENSORS,
    Key,
    canonical,
    expert_index,
    num_experts,
    spell,
    translate,
)

ROW_DIALECTS = ("hf", "gguf", "torchtune")
EXPERT_DIALECTS = ("hf", "gguf", "mlx", "hf_stacked")


def _spelled(row, dialects):
    return [d for d in dialects if getattr(row, d) is not None]


def _params(row, dialect_pair):
    # torchtune's norms have only a `.scale` (= `.weight`); everything else may carry a bias too
    if "torchtune" in dialect_pair and row.torchtune and row.torchtune.endswith("norm"):
        return ("weight",)
    return ("weight", "bias", "")


@pytest.mark.parametrize("row", TENSORS, ids=lambda r: f"{r.kind}:{r.hf}")
def test_every_row_round_trips_between_every_pair_of_spellings(row):
    bid = "7" if row.block else None
    dialects = _spelled(row, ROW_DIALECTS)
    assert "hf" in dialects and len(dialects) >= 2
    checked = 0
    for a, b in itertools.permutations(dialects, 2):
        for param in _params(row, (a, b)):
            key = Key(row, bid, None, param)
            name_a, name_b = spell(key, a), spell(key, b)
            assert key in canonical(name_a, a), (a, name_a)  # canonical -> A -> canonical
            assert translate(name_a, a, b, {name_b}) == name_b  # A -> B, the base choosing among families
            assert translate(name_b, b, a, {name_a}) == name_a  # B -> A
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("row", EXPERTS, ids=lambda r: f"{r.kind}:{r.hf}")
def test_every_expert_row_round_trips(row):
    per_expert = spell(Key(row, "2", 5, "weight"), "hf")
    assert per_expert.startswith("model.layers.2.") and ".5." in per_expert
    assert expert_index(per_expert) == 5
    for stacked_dialect in EXPERT_DIALECTS[1:]:
        stacked = spell(Key(row, "2", None, ""), stacked_dialect)
        assert "{xid}" not in stacked
        # per-expert -> the stacked tensor holding it -> the per-expert template, as expert 5 again
        assert translate(per_expert, "hf", stacked_dialect, experts=True) == stacked
        template = translate(stacked, stacked_dialect, "hf", {per_expert.replace(".5.", ".0.")}, experts=True)
        assert template.format(xid=5) == per_expert
        for other in EXPERT_DIALECTS[1:]:
            if other != stacked_dialect:
                there = spell(Key(row, "2", None, ""), other)
                assert translate(stacked, stacked_dialect, other, {there}, experts=True) == there
                assert translate(there, other, stacked_dialect, {stacked}, experts=True) == stacked
    # a stacking is not a rename: the plain walk does not see expert tensors
    assert translate(per_expert, "hf", "gguf") is None


@pytest.mark.parametrize("table,dialects", [(TENSORS, ROW_DIALECTS), (EXPERTS, EXPERT_DIALECTS)])
def test_a_spelling_shared_by_rows_means_one_kind(table, dialects):
    """Two rows may share a spelling only as one kind spelt differently by families (`ffn_gate_inp`); a
    copy-paste typo (q_proj on the k row) would give two kinds one spelling and fail here."""
    for d in dialects:
        seen: dict[tuple[bool, str], str] = {}
        for row in table:
            s = getattr(row, d)
            if s is None:
                continue
            k = (row.block, s)
            assert seen.setdefault(k, row.kind) == row.kind, (d, s, seen[k], row.kind)
    # and one family never has two spellings of a kind in the same dialect
    for d in dialects:
        for a, b in itertools.combinations(table, 2):
            if a.kind == b.kind and getattr(a, d) != getattr(b, d):
                assert not set(a.families.split()) & set(b.families.split()), (d, a, b)


def test_translate_without_base_names_takes_the_first_line_and_with_them_the_existing_one():
    assert translate("blk.0.ffn_gate_inp.weight", "gguf", "hf") == "model.layers.0.mlp.gate.weight"
    mixtral = {"model.layers.0.block_sparse_moe.gate.weight"}
    assert translate("blk.0.ffn_gate_inp.weight", "gguf", "hf", mixtral) == next(iter(mixtral))
    mixtral_expert = {"model.layers.0.block_sparse_moe.experts.0.w3.weight"}
    assert translate("blk.0.ffn_up_exps.weight", "gguf", "hf", mixtral_expert, experts=True) == \
        "model.layers.0.block_sparse_moe.experts.{xid}.w3.weight"


def test_translate_refuses_what_is_not_in_the_table():
    assert translate("model.layers.0.self_attn.rotary_emb.weight", "hf", "gguf") is None
    assert translate("model.layers.0.mlp.gate.weight", "hf", "torchtune") is None  # no torchtune MoE
    assert translate("layers.x.attn.q_proj.weight", "torchtune", "hf") is None
    assert translate("model.layers.0.mlp.experts.1.gate_proj.bias", "hf", "gguf", experts=True) is None
    assert translate("blk.0.ffn_gate_exps.weight", "gguf", "hf") is None  # 2-D lookup of a stacked name
    with pytest.raises(ValueError, match="dialect"):
        translate("lm_head.weight", "hf", "ggml")
    assert set(BLOCK_PREFIX) == {"hf", "gguf", "torchtune", "mlx", "hf_stacked"}


def test_torchtune_norms_spell_weight_as_scale():
    assert translate("model.layers.1.input_layernorm.weight", "hf", "torchtune") == "layers.1.sa_norm.scale"
    assert translate("norm.scale", "torchtune", "hf") == "model.norm.weight"
    assert translate("layers.1.attn.output_proj.bias", "torchtune", "hf") == "model.layers.1.self_attn.o_proj.bias"


@pytest.mark.parametrize("cls,want", [("MixtralConfig", 8), ("Qwen2MoeConfig", 60), ("Qwen3MoeConfig", 128),
                                      ("OlmoeConfig", 64), ("DeepseekV3Config", 256)])
def test_num_experts_reads_each_family_config(cls, want):
    """The real transformers configs: DeepSeek counts routed experts as `n_routed_experts` (the key the GGUF
    writer's copy of this function lacked)."""
    import transformers

    config = getattr(transformers, cls)().to_dict()
    assert num_experts(config, 3) == want


def test_num_experts_falls_back_to_what_the_adapter_shows():
    assert num_experts(None, 3) == 3
    assert num_experts({"num_experts": 0, "num_local_experts": "8"}, 5) == 5
    assert num_experts({"model_type": "llama"}, 2) == 2


@pytest.mark.parametrize("to", ["gguf", "mlx"])
def test_expert_beyond_the_base_is_refused_by_both_stacking_writers(tmp_path, to):
    """An 8-expert SwitchLinear adapter against the 4-expert fixture base: both writers that stack experts
    (their expert count from the one `num_experts`) refuse it with the expert named; GGUF used to crash."""
    from safetensors.torch import load_file, save_file

    from loraport.conversion import convert_adapter
    from loraport.errors import BadInputError
    from tests._llm_util import LLM, MOE

    src, ad = LLM / "mlx" / "qwen2moe_switch", tmp_path / "ad"
    ad.mkdir()
    doubled = {k: (v.repeat(2, *[1] * (v.dim() - 1)) if v.dim() == 3 else v)
               for k, v in load_file(src / "adapters.safetensors").items()}
    save_file(doubled, ad / "adapters.safetensors", {"format": "mlx"})
    (ad / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    with pytest.raises(BadInputError, match=r"experts\.4\..*expert index 4 beyond the base's 4 experts"):
        convert_adapter(ad, to, out, base=MOE)
    assert not out.exists()
