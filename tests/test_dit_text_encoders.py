"""kohya text-encoder prefixes of the DiT families whose sd-scripts trainers can train the text encoder: Chroma's
T5 (`lora_te3_`, as Flux's: sd-scripts' lora_flux gives Chroma a dummy CLIP-L with no linear layers) and
Lumina2's Gemma2 (`lora_te_`, sd-scripts' lora_lumina) land on the diffusers folder's `text_encoder`, whose
weights transformers then loads; against the original single file (transformer only) they are refused naming
the prefix. The text encoders are tiny models built with transformers' own classes."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.api import convert, merge
from loraport.errors import BadInputError
from tests._dit_util import F, folder_weights, max_diff


def _t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(5)
    return T5EncoderModel(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))


def _gemma2():
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(7)
    return Gemma2Model(Gemma2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=4))


# family → (its diffusers folder, its kohya LoRA, the text encoder, [(sd-scripts module name, text-encoder weight)])
CASES = {
    "chroma": ("chroma-diffusers", "chroma_kohya", _t5,
               [("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "encoder.block.0.layer.0.SelfAttention.q"),
                ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wo", "encoder.block.0.layer.1.DenseReluDense.wo")]),
    "lumina2": ("lumina2-diffusers", "lumina2_kohya", _gemma2,
                [("lora_te_layers_0_self_attn_k_proj", "layers.0.self_attn.k_proj"),
                 ("lora_te_layers_0_mlp_gate_proj", "layers.0.mlp.gate_proj")]),
}


def _setup(family: str, tmp_path):
    folder_name, lora_name, make, modules = CASES[family]
    folder = tmp_path / family
    shutil.copytree(F / folder_name, folder)
    te = make()
    te.save_pretrained(folder / "text_encoder")
    base_te = load_file(folder / "text_encoder" / "model.safetensors")
    g = torch.Generator().manual_seed(11)
    lora = dict(load_file(F / f"{lora_name}.safetensors"))
    want = dict(base_te)
    for name, weight in modules:
        out, inp = base_te[weight + ".weight"].shape
        down, up = torch.randn(2, inp, generator=g), torch.randn(out, 2, generator=g)
        lora |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
        want[weight + ".weight"] = base_te[weight + ".weight"] + 0.5 * up @ down  # sd-scripts: alpha / r
    src = tmp_path / f"{family}_te.safetensors"
    save_file(lora, src)
    return folder, src, want, make


@pytest.mark.parametrize("family", list(CASES))
def test_kohya_text_encoder_modules_land_on_the_pipeline_text_encoder(family, tmp_path):
    folder, src, want, make = _setup(family, tmp_path)
    merge(folder, [str(src)], tmp_path / "o")
    te = make().from_pretrained(tmp_path / "o" / "text_encoder")  # transformers loads what was written
    got = {k: v.detach() for k, v in te.state_dict().items()}
    assert max(float((got[k] - v).abs().max()) for k, v in want.items() if k in got) <= 1e-6
    assert sum(not torch.equal(got[k], v) for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()
               if k in got) == 2, "exactly the two trained text-encoder weights change"
    # the transformer part is the kohya file's own merge (checked against diffusers in tests/test_dit_<family>.py)
    alone = tmp_path / "alone"
    merge(F / CASES[family][0], [str(F / f"{CASES[family][1]}.safetensors")], alone)
    assert max_diff(folder_weights(tmp_path / "o"), folder_weights(alone)) == 0


@pytest.mark.parametrize("family", list(CASES))
def test_text_encoder_modules_round_trip_and_are_refused_by_the_single_file(family, tmp_path):
    folder, src, _, _ = _setup(family, tmp_path)
    prefix = CASES[family][3][0][0].split("_", 2)[0] + "_" + CASES[family][3][0][0].split("_", 2)[1]
    via = tmp_path / "d.safetensors"
    convert(str(src), to="diffusers", out=via, base=folder)  # text_encoder.<module> in diffusers' names
    assert any(k.startswith("text_encoder." + CASES[family][3][0][1]) for k in load_file(via))
    back = tmp_path / "k.safetensors"
    convert(str(via), to="kohya", out=back, base=folder)
    assert {n for n, _ in CASES[family][3]} <= {k.split(".")[0] for k in load_file(back)}
    single = F / f"{family}-original.safetensors"
    with pytest.raises(BadInputError, match=f"not in the base.*{prefix}_") as e:
        merge(single, [str(src)], tmp_path / "o.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "o.safetensors").exists()
