"""PEFT `target_parameters` LoRA on transformers 5's fused MoE experts, and multimodal text-tower prefixes.

Oracle: PEFT's own merge_and_unload (+ save_pretrained) on tiny models built with transformers' classes
(Qwen3-MoE, Mixtral, gpt-oss, Llama 4 text); loraport merges into the base as save_pretrained wrote it (per
expert for Qwen/Mixtral, fused for gpt-oss/Llama 4) and into a fused-on-disk copy (the in-memory state dict);
`from_pretrained` of each output must give PEFT's merged logits. Conversions to GGUF / MLX must merge back to
the same tensors; PEFT loads what `convert --to peft` writes. ~15 s of CPU in all (plus imports).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraport
from loraport.errors import BadInputError

TOL = 1e-5
X = torch.tensor([[3, 17, 42, 5, 9, 60, 1]])


def _tiny(arch: str):
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=8,
                                                          num_experts=4, num_experts_per_tok=2, mlp_only_layers=[])
    if arch == "mixtral":
        return tf.MixtralForCausalLM, tf.MixtralConfig(**common, intermediate_size=8, num_local_experts=4,
                                                        num_experts_per_tok=2)
    if arch == "gpt_oss":  # 2·I == H: gate_up_proj is square, only the model type tells its orientation
        return tf.GptOssForCausalLM, tf.GptOssConfig(**common, intermediate_size=8, num_local_experts=4,
                                                      num_experts_per_tok=2, sliding_window=4,
                                                      layer_types=["sliding_attention", "full_attention"])
    return tf.Llama4ForCausalLM, tf.Llama4TextConfig(**common, intermediate_size=8, intermediate_size_mlp=16,
                                                      num_local_experts=4, num_experts_per_tok=1,
                                                      interleave_moe_layer_step=1, moe_layers=[0, 1],
                                                      no_rope_layers=[1, 1], attention_chunk_size=16)


CASES = {  # arch -> (target_parameters, target_modules)
    "qwen3_moe": (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], ["q_proj"]),
    "mixtral": (["experts.gate_up_proj"], []),
    "gpt_oss": (["mlp.experts.down_proj", "mlp.experts.gate_up_proj"], []),
    "llama4": (["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"], []),
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """arch -> folders (base as saved, fused copy, adapter, PEFT's merged save) and PEFT's merged logits."""
    from peft import LoraConfig, get_peft_model

    built = {}

    def build(arch: str) -> dict:
        if arch in built:
            return built[arch]
        root = tmp_path_factory.mktemp(arch)
        cls, cfg = _tiny(arch)
        torch.manual_seed(0)
        model = cls(cfg).eval()
        model.save_pretrained(root / "base")
        (root / "fused").mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "fused" / "model.safetensors",
                  {"format": "pt"})
        shutil.copy(root / "base" / "config.json", root / "fused")
        params, modules = CASES[arch]
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=modules, target_parameters=params,
                                              init_lora_weights=False))
        pm.save_pretrained(root / "adapter")
        merged = pm.merge_and_unload()
        with torch.no_grad():
            logits = merged(X).logits
        merged.save_pretrained(root / "oracle")
        built[arch] = dict(root=root, cls=cls, logits=logits)
        return built[arch]

    return build


def _logits(cls, folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return cls.from_pretrained(folder).eval()(X).logits


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(ta) == set(tb)
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


@pytest.mark.parametrize("arch", list(CASES))
def test_merge_equals_peft_on_the_saved_and_the_fused_base(moe, arch, tmp_path):
    c = moe(arch)
    root = c["root"]
    # the update is not a no-op: PEFT's merged experts differ from the base
    assert _max_diff(root / "oracle", root / "base") > 1e-3
    for layout in ("base", "fused"):
        out = tmp_path / layout
        loraport.merge(root / layout, root / "adapter", out)
        if layout == "base":  # the same files PEFT's merged model saves, tensor for tensor
            assert _max_diff(out, root / "oracle") < TOL
        got = _logits(c["cls"], out)
        assert float((got - c["logits"]).abs().max()) < TOL, layout


def test_saved_qwen_and_mixtral_bases_are_per_expert_and_the_adapter_nests_base_layer(moe):
    """The traps, checked on the real producers: save_pretrained writes experts per expert (Mixtral under
    block_sparse_moe.w1/w2/w3) while PEFT names keys by the fused in-memory modules, and two parameters on one
    module are told apart only by `base_layer.` nesting."""
    from safetensors import safe_open

    names = {a: list(safe_open(moe(a)["root"] / "base" / "model.safetensors", "pt").keys())
             for a in ("qwen3_moe", "mixtral")}
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in names["qwen3_moe"]
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in names["mixtral"]
    keys = list(safe_open(moe("qwen3_moe")["root"] / "adapter" / "adapter_model.safetensors", "pt").keys())
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.experts.lora_A.weight" in keys


def test_nesting_is_read_without_a_base_in_definition_order(moe):
    """Without a base the key sets are assigned by the modules' definition order (gate_up_proj innermost),
    whatever order the saved target_parameters list has (PEFT keeps a set)."""
    src = moe("qwen3_moe")["root"] / "adapter"
    ad = loraport.load_adapter(src)
    shapes = {d.target: tuple(d.parts[0].B.shape[1:2]) + tuple(d.parts[0].A.shape[2:]) for d in ad.deltas
              if d.target.startswith("model.layers.0.mlp.experts")}
    assert shapes == {"model.layers.0.mlp.experts.gate_up_proj": (16, 16),
                      "model.layers.0.mlp.experts.down_proj": (16, 8)}


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("to", ["gguf", "mlx"])
def test_convert_to_per_expert_stacks_merges_back_to_peft(moe, arch, to, tmp_path):
    c = moe(arch)
    root = c["root"]
    for layout in ("base", "fused"):
        conv = tmp_path / f"{layout}.{to}" if to == "gguf" else tmp_path / f"{layout}_mlx"
        loraport.convert(root / "adapter", to, conv, base=root / layout)
        out = tmp_path / f"merged_{layout}"
        loraport.merge(root / layout, conv, out)
        if layout == "base":
            assert _max_diff(out, root / "oracle") < TOL
        assert float((_logits(c["cls"], out) - c["logits"]).abs().max()) < TOL
    if to == "mlx":
        from safetensors import safe_open

        keys = set(safe_open(tmp_path / "base_mlx" / "adapters.safetensors", "pt").keys())
        switch = "block_sparse_moe.switch_mlp" if arch == "mixtral" else "mlp.switch_mlp"
        assert f"model.layers.1.{switch}.up_proj.lora_b" in keys


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")  # PEFT 0.21: spurious
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_convert_to_peft_writes_target_parameters_that_peft_merges_the_same(moe, arch, tmp_path):
    """PEFT → PEFT keeps the fused form (nesting and is_transposed orientation as PEFT expects them), on either
    base layout; a GGUF made against the fused base (gate and up as separate stacks) comes back as one
    block-diagonal gate_up LoRA. Loaded by PEFT itself, its merge gives the original merge's logits."""
    from peft import PeftModel

    c = moe(arch)
    root = c["root"]
    sources = [("adapter", "base"), ("adapter", "fused")]
    if arch == "qwen3_moe":
        loraport.convert(root / "adapter", "gguf", tmp_path / "a.gguf", base=root / "fused")
        sources.append((tmp_path / "a.gguf", "fused"))
    for i, (src, layout) in enumerate(sources):
        out = tmp_path / f"peft{i}"
        loraport.convert(root / src, "peft", out, base=root / layout)
        assert json.loads((out / "adapter_config.json").read_text())["target_parameters"]
        with torch.no_grad():
            got = PeftModel.from_pretrained(c["cls"].from_pretrained(root / "base"), out).merge_and_unload()(X).logits
        assert float((got - c["logits"]).abs().max()) < TOL, (src, layout)
    with pytest.raises(BadInputError, match="needs base"):
        loraport.convert(root / "adapter", "peft", tmp_path / "nobase")


@pytest.mark.parametrize("to", ["gguf", "mlx"])
def test_convert_refuses_what_the_writer_cannot_name(moe, to, tmp_path):
    out = tmp_path / ("x.gguf" if to == "gguf" else "x_mlx")
    with pytest.raises(BadInputError, match="gpt_oss|fused expert parameter"):
        loraport.convert(moe("gpt_oss")["root"] / "adapter", to, out, base=moe("gpt_oss")["root"] / "base")
    with pytest.raises(BadInputError, match="base"):  # Qwen and Mixtral spell per-expert MLX/GGUF names apart
        loraport.convert(moe("mixtral")["root"] / "adapter", to, out)
    assert not out.exists()


def test_nested_key_sets_that_fit_no_parameter_are_refused(moe, tmp_path):
    """Nested key sets that match neither the listed parameters nor the base's shapes: one line, no output."""
    bad = tmp_path / "ad"
    shutil.copytree(moe("qwen3_moe")["root"] / "adapter", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.experts.extra"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="base_layer depths"):
        loraport.merge(moe("qwen3_moe")["root"] / "base", bad, tmp_path / "out")
    cfg["target_parameters"] = cfg["target_parameters"][:2]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"
    t[key] = torch.randn(t[key].shape[0], 12)  # an input width no expert parameter of the base has
    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(BadInputError, match="fit none of its parameters"):
        loraport.merge(moe("qwen3_moe")["root"] / "base", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- multimodal text towers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A tiny Gemma 3 (text + SigLIP vision) and its text tower as a Gemma3ForCausalLM with the same weights.
    transformers 5 names the tower `model.language_model.` in memory (PEFT's keys) and save_pretrained writes the
    transformers 4 spelling `language_model.model.`; the text-only model is `model.`."""
    import transformers as tf

    root = tmp_path_factory.mktemp("gemma3")
    tc = tf.Gemma3TextConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"])
    vc = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=4,
                          image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    mm = tf.Gemma3ForConditionalGeneration(cfg).eval()
    mm.save_pretrained(root / "mm")
    text = tf.Gemma3ForCausalLM(mm.config.text_config).eval()
    text.model.load_state_dict(mm.model.language_model.state_dict())
    text.save_pretrained(root / "text")
    return dict(root=root, mm=tf.Gemma3ForConditionalGeneration, text=tf.Gemma3ForCausalLM)


def _peft_on(cls, base: Path, modules, out: Path, seed: int) -> torch.Tensor:
    """A PEFT adapter (random B: init_lora_weights=False) on `cls` loaded from `base`, saved to `out`; returns
    PEFT's merged logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(cls.from_pretrained(base).eval(), LoraConfig(r=2, lora_alpha=4, target_modules=modules,
                                                                    init_lora_weights=False))
    pm.save_pretrained(out)
    with torch.no_grad():
        return pm.merge_and_unload()(X).logits


def _respell(src: Path, dst: Path, old: str, new: str) -> None:
    """The same adapter with its keys' text-tower prefix spelled another way (as transformers 4 named it)."""
    shutil.copytree(src, dst)
    t = load_file(src / "adapter_model.safetensors")
    assert any(k.startswith(old) for k in t)
    save_file({k.replace(old, new, 1): v for k, v in t.items()}, dst / "adapter_model.safetensors")


def test_multimodal_text_tower_prefixes_merge_both_ways(gemma3, tmp_path):
    g, root = gemma3, gemma3["root"]
    base_logits = _logits(g["text"], root / "text")
    assert float((_logits(g["mm"], root / "mm") - base_logits).abs().max()) < TOL  # one text tower, two layouts
    # trained on the text-only model (keys model.layers.*) -> the multimodal checkpoint (language_model.model.*)
    ref = _peft_on(g["text"], root / "text", ["q_proj", "down_proj"], tmp_path / "ad_text", 1)
    assert float((ref - base_logits).abs().max()) > 1e-3
    loraport.merge(root / "mm", tmp_path / "ad_text", tmp_path / "text_into_mm")
    assert float((_logits(g["mm"], tmp_path / "text_into_mm") - ref).abs().max()) < TOL
    # trained on the multimodal model (transformers 5 keys model.language_model.*, and the transformers 4
    # spelling language_model.model.*) -> the text-only model and the multimodal checkpoint
    ref = _peft_on(g["mm"], root / "mm", r".*language_model.*\.(q_proj|down_proj)", tmp_path / "ad_mm", 2)
    _respell(tmp_path / "ad_mm", tmp_path / "ad_v4", "base_model.model.model.language_model.",
             "base_model.model.language_model.model.")
    for ad in ("ad_mm", "ad_v4"):
        for base in ("text", "mm"):
            out = tmp_path / f"{ad}_into_{base}"
            loraport.merge(root / base, tmp_path / ad, out)
            assert float((_logits(g[base], out) - ref).abs().max()) < TOL, (ad, base)


def test_validate_reference_puts_per_expert_targets_on_the_fused_live_parameter(moe, tmp_path):
    """validate's reference hooks the adapter into the model transformers builds: per-expert checkpoint names
    land on their expert's rows of the fused in-memory parameter; a merged artifact passes, the base fails."""
    root = moe("mixtral")["root"]
    loraport.merge(root / "base", root / "adapter", tmp_path / "mix")
    assert loraport.validate(tmp_path / "mix", base=root / "base", adapters=root / "adapter", seq=8).passed
    assert not loraport.validate(root / "base", base=root / "base", adapters=root / "adapter", seq=8).passed


def test_validate_reference_finds_prefixed_text_tower_modules(gemma3, tmp_path):
    """A multimodal checkpoint saved as `language_model.model.*`, its live modules `model.language_model.*`."""
    g = gemma3["root"]
    _peft_on(gemma3["mm"], g / "mm", r".*language_model.*\.(q_proj|down_proj)", tmp_path / "ad", 3)
    loraport.merge(g / "mm", tmp_path / "ad", tmp_path / "mm")
    assert loraport.validate(tmp_path / "mm", base=g / "mm", adapters=tmp_path / "ad", seq=8).passed
    assert not loraport.validate(g / "mm", base=g / "mm", adapters=tmp_path / "ad", seq=8).passed
