"""The engine's seams (loraport/engine/): bases opened through the source registry, adapter targets resolved in
one place, a merge assembled from the stages by hand equal to `merge()`, and merge options an .onnx base cannot
honour refused rather than ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraport.checkpoint import Checkpoint
from loraport.engine import sources
from loraport.errors import BadInputError

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "fixtures"


def test_registry_opens_each_layout():
    from loraport.quant.bnb_checkpoint import BnbCheckpoint

    kinds = {}
    for p in (FX / "peft/bases/llama", FX / "sd/base", FX / "peft/bases/conv/model.safetensors",
              FX / "quant/llama-nf4-dq"):
        ck = sources.open_base(p)
        kinds[p.name] = (ck.kind, type(ck) is BnbCheckpoint)
        ck.close()
    assert kinds == {"llama": ("hf-folder", False), "base": ("diffusers-folder", False),
                     "model.safetensors": ("safetensors-file", False), "llama-nf4-dq": ("hf-folder", True)}
    assert [s.name for s in sources.LAYERED] == ["bitsandbytes", "fp8", "mxfp4", "unknown quantization"]
    with pytest.raises(BadInputError, match="--fp16-base"):  # the fp16 original of a base that is not quantized
        sources.open_base(FX / "peft/bases/llama", fp16_base=FX / "peft/bases/llama")


def test_targets_resolved_in_one_place():
    gpt2 = Checkpoint.open(FX / "peft/bases/gpt2")  # tied: only the input embedding is saved
    llama = Checkpoint.open(FX / "peft/bases/llama")
    try:
        assert sources.resolve_target(gpt2, "lm_head.weight") == ["transformer.wte.weight"]
        q = "model.layers.0.self_attn.q_proj.weight"
        assert sources.resolve_target(llama, q) == [q]
        assert sources.resolve_target(llama, q.removeprefix("model.")) == [q]  # bare-model spelling
        assert sources.resolve_target(llama, "model.layers.9.nothing.weight") == []
    finally:
        gpt2.close()
        llama.close()


def test_stages_by_hand_equal_merge(tmp_path):
    """source → plan → layout → stream → sink, assembled by hand, writes what merge() writes."""
    from loraport.engine.device import pick_device
    from loraport.engine.layout import build_layout
    from loraport.engine.plan import build_plan
    from loraport.engine.sinks import SafetensorsSink
    from loraport.engine.stream import stream
    from loraport.formats import load_adapter
    from loraport.merging import merge

    base = FX / "peft/bases/conv/model.safetensors"
    ad_path = FX / "peft/adapters/conv_lora"
    merge(base, [ad_path], tmp_path / "api.safetensors", manifest=False, device="cpu", dtype="fp16")
    ck = sources.open_base(base)
    ad = load_adapter(ad_path, base=ck)
    plan = build_plan(ck, [(ad, 1.0)])
    layout = build_layout(plan, torch.float16, None, None)
    from loraport.engine.sinks import provenance

    sink = SafetensorsSink(layout, tmp_path / "hand.safetensors", True, provenance([(ad, 1.0)], "fp16", None),
                           hash_outputs=False)
    seen = []

    class Bar:
        def __init__(self, total):
            seen.append(total)

        def __enter__(self):
            return seen.append

        def __exit__(self, *exc):
            return False

    stats = stream(plan, layout, sink, pick_device("cpu"), torch.float16, None, progress=Bar)
    ck.close()
    assert (tmp_path / "hand.safetensors").read_bytes() == (tmp_path / "api.safetensors").read_bytes()
    assert seen[0] == stats["bytes"] == sum(seen[1:]) and len(seen) == 1 + len(layout[0].sources)


@pytest.mark.parametrize("kw,flag", [({"dtype": "fp16"}, "--dtype"), ({"shard_size": 1 << 20}, "--shard-size")])
def test_onnx_base_refuses_options_it_cannot_honour(tmp_path, kw, flag):
    pytest.importorskip("onnx")
    from loraport.api import run_merge  # the merge verb's router: an .onnx base is baked, not streamed

    base = tmp_path / "model.onnx"
    base.write_bytes(b"")  # refused before the model is read
    with pytest.raises(BadInputError, match=flag):
        run_merge(str(base), [(str(FX / "peft/adapters/llama_plain"), 1.0)], tmp_path / "out.onnx", **kw)
    assert not (tmp_path / "out.onnx").exists()
