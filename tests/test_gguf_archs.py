"""GGUF adapters for every architecture llama.cpp's name map covers (loraport/names/gguf_map.py), against
llama.cpp's own convert_lora_to_gguf.py: its recorded output (fixtures/gguf_archs/oracle.json, made by
fixtures/makers/gguf_archs.py) in the default run for two architectures, and — slow, with LORAPORT_LLAMACPP
pointing at a llama.cpp tree — the live converter on all of them, tensor values included:

    LORAPORT_LLAMACPP=/path/to/llama.cpp pytest -m slow tests/test_gguf_archs.py
"""

from __future__ import annotations

import pytest
import torch

from _gguf_arch_util import ARCHS, build, converter, load_oracle, run_oracle, summary, tensors
from _llm_util import loraport_deltas, max_diff

DEFAULT = ("gemma2", "phi3")  # a plain rename and llama.cpp's fused qkv / gate_up tensors
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _convert(tmp_path, arch):
    from loraport.api import convert

    base, adapter = build(arch, tmp_path)
    out = tmp_path / f"{arch}.gguf"
    convert(adapter, "gguf", out, base=base)
    return base, adapter, out


def test_every_arch_is_known_to_the_installed_gguf():
    import gguf

    from loraport.names.gguf_map import ARCHS as TABLE

    import transformers

    known = set(gguf.MODEL_ARCH_NAMES.values())
    assert {a.gguf for a in TABLE.values()} <= known
    built = {getattr(transformers, cls).model_type for cls, _, _ in ARCHS.values()}
    assert built <= set(TABLE)  # every model_type the tests build has a row


def test_map_is_per_architecture_and_asked_only_about_the_base():
    """gguf-py's map decides per architecture (Gemma 2's post_attention_layernorm is its own tensor, Llama's is
    ffn_norm); fused Phi-3 tensors keep their one GGUF name; a GGUF name two base tensors claim is dropped."""
    from loraport.names.gguf_map import gguf_name, hf_names

    assert gguf_name("model.layers.3.post_attention_layernorm.weight", "gemma2") == "blk.3.post_attention_norm.weight"
    assert gguf_name("model.layers.3.post_attention_layernorm.weight", "llama") == "blk.3.ffn_norm.weight"
    phi = ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight", "lm_head.weight"]
    assert hf_names([], "phi3", phi) == {"blk.0.attn_qkv.weight": phi[0], "blk.0.ffn_up.weight": phi[1],
                                         "output.weight": phi[2]}
    both = ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.router.weight"]  # both ffn_gate_inp in the map
    assert hf_names([], "deepseek2", both) == {}


def test_oracle_covers_every_arch():
    assert set(load_oracle()) == set(ARCHS)


@pytest.mark.parametrize("arch", [a if a in DEFAULT else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_writer_matches_llamacpp_record(tmp_path, arch):
    """Names, shapes, architecture and alpha as llama.cpp's converter writes them; read back against the HF
    base (names through the same map, q/k un-permuted), the deltas are PEFT's adapter's."""
    base, adapter, out = _convert(tmp_path, arch)
    assert summary(out) == load_oracle()[arch]
    assert max_diff(loraport_deltas(out, base), loraport_deltas(adapter, base)) < 1e-6


def test_mla_kv_b_proj_refused(tmp_path):
    """llama.cpp splits DeepSeek's kv_b_proj per head into attn_k_b (transposed) / attn_v_b: no LoRA pair."""
    from loraport.api import convert
    from loraport.errors import BadInputError

    base, adapter = build("deepseek_v2", tmp_path, targets=["kv_b_proj", "o_proj"])
    out = tmp_path / "mla.gguf"
    with pytest.raises(BadInputError, match="kv_b_proj"):
        convert(adapter, "gguf", out, base=base)
    assert not out.exists() and not list(tmp_path.glob("mla*"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_writer_equals_live_converter(tmp_path, arch):
    """Tensor for tensor, bit for bit (f32), what llama.cpp's convert_lora_to_gguf.py writes from the same
    PEFT adapter and base (q/k permutation and fused tensors included)."""
    script = converter()
    if script is None:
        pytest.skip("LORAPORT_LLAMACPP does not point at a llama.cpp tree with convert_lora_to_gguf.py")
    base, adapter, out = _convert(tmp_path, arch)
    ref = tmp_path / "oracle.gguf"
    p = run_oracle(script, base, adapter, ref)
    assert p.returncode == 0, p.stderr[-2000:]
    assert summary(out) == summary(ref)
    mine, theirs = tensors(out), tensors(ref)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_readme_arch_matrix_is_the_tables():
    import re

    import transformers

    from _gguf_arch_util import ROOT
    from loraport.names.support import ORACLE_CHECKED, arch_matrix

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- arch-matrix:start -->\n(.*?)\n<!-- arch-matrix:end -->", readme, re.S)
    assert block and block.group(1).strip() == arch_matrix().strip(), (
        "README architecture matrix is out of date: paste loraport.names.support.arch_matrix()")
    # a ✓ in the matrix is a model type this file really checks against the converter
    assert set(ORACLE_CHECKED) == {getattr(transformers, cls).model_type for cls, _, _ in ARCHS.values()}
