"""`convert --to onnx --with-past`: KV-cache inputs/outputs. Each export is run in onnxruntime step by step —
a prompt with an empty past (past_sequence = 0), then single tokens fed the previous `present.*` as
`past_key_values.*` — and the logits of all steps are compared with transformers + PEFT (adapter unmerged,
fp32) on the whole sequence. Models are 3-layer, so the 2-layer trace + layer cloning (with its per-layer
past inputs / present outputs) is what is being checked."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tests._onnx_util import export_kw, hf_model, max_abs, workdir

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=32, n_inner=64, n_layer=3, n_head=4, n_positions=64)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=False, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=4)),  # window < the 8 tokens tested
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
}
L = 3


def _make(family: str):
    import peft
    import transformers

    d = workdir(f"past-{family}")
    base, ad = d / "base", d / "lora"
    if not (ad / "adapter_config.json").is_file():
        cls, extra = FAMILIES[family]
        cfg = getattr(transformers, cls)(**extra) if family == "gpt2" else getattr(transformers, cls)(**COMMON, **extra)
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(cfg)
        m.save_pretrained(base)
        pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False, fan_in_fan_out=family == "gpt2"))
        pm.save_pretrained(ad)
    return base, ad


def _inputs(batch: int, seq: int, seed: int, left_pad: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Token ids, attention mask (row i left-padded by left_pad[i]) and the position ids a generation loop
    would use (count of real tokens before each one)."""
    g = np.random.default_rng(seed)
    ids = g.integers(0, 128, size=(batch, seq), dtype=np.int64)
    am = np.ones((batch, seq), dtype=np.int64)
    for i, p in enumerate(left_pad):
        am[i, :p] = 0
    pos = np.clip(np.cumsum(am, axis=1) - 1, 0, None)
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos}


def _reference(base, adapter, f: dict):
    """transformers + PEFT (unmerged), whole sequence in one forward; returns (logits, model) ."""
    m = hf_model(base)
    if adapter is not None:
        import peft

        m = peft.PeftModel.from_pretrained(m, str(adapter)).eval()
    with torch.no_grad():
        out = m(**{k: torch.from_numpy(v) for k, v in f.items()}, use_cache=False).logits.numpy()
    return out, m


class _Ort:
    def __init__(self, model, adapter=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        self.ro = None
        if adapter is not None:
            self.adapter = ort.LoraAdapter()
            self.adapter.Load(str(adapter))
            self.ro = ort.RunOptions()
            self.ro.add_active_adapter(self.adapter)
        self.last: list = []

    def run(self, feeds):
        names = {i.name for i in self.sess.get_inputs()}
        self.last = self.sess.run(None, {k: v for k, v in feeds.items() if k in names}, self.ro)
        return self.last

    def steps(self, f: dict, splits: list[int]) -> np.ndarray:
        from loraport.onnx.past import run_steps

        return run_steps(self.run, self.sess.get_inputs(), [o.name for o in self.sess.get_outputs()], f, splits)


def _check_steps(model, base, adapter, f, splits, onnx_adapter=None, tol=1e-4) -> float:
    got = _Ort(model, onnx_adapter).steps(f, splits)
    ref, _ = _reference(base, adapter, f)
    real = f["attention_mask"].astype(bool)  # padded positions attend to nothing: their logits are arbitrary
    err = max_abs(got[real], ref[real])
    assert err <= tol, err
    return err


@pytest.fixture(scope="module")
def llama():
    base, ad = _make("llama")
    return base, ad, export_kw(base, [(ad, 1.0)], with_past=True)


def test_with_past_layout(llama):
    _, _, out = llama
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    past = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in m.graph.output] == ["logits", *present]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    io = {v.name: dims(v) for v in [*m.graph.input, *m.graph.output]}
    assert io["input_ids"] == io["position_ids"] == ["batch", "sequence"]
    assert io["attention_mask"] == ["batch", "past_sequence + sequence"]
    for i in range(L):
        assert io[f"past_key_values.{i}.value"] == ["batch", 2, "past_sequence", 8]
        assert io[f"present.{i}.key"] == ["batch", 2, "past_sequence + sequence", 8]
    man = json.loads((out / "loraport_onnx.json").read_text())
    assert man["with_past"] is True and man["outputs"] == ["logits", *present] and man["inputs"][3:] == past
    # 2-layer trace, layer 1 cloned: layer 2 has its own weights and its own cache tensors
    assert {t.name for t in m.graph.initializer} >= {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(L)}


@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 6)])  # traced with batch 2, sequence 5, past 3
def test_llama_steps_match_peft_and_present_is_transformers_cache(llama, batch, seq):
    base, ad, out = llama
    f = _inputs(batch, seq, seed=seq)
    ref, model = _reference(base, ad, f)
    assert max_abs(ref, _reference(base, None, f)[0]) > 1e-2  # the adapter matters
    run = _Ort(out / "model.onnx")
    got = run.steps(f, [seq - 2, seq - 1, seq])
    assert max_abs(got, ref) <= 1e-4
    # the last step's present.* holds the keys/values of the whole sequence, as transformers' cache does
    with torch.no_grad():
        cache = model(**{k: torch.from_numpy(v) for k, v in f.items()}, use_cache=True).past_key_values
    for i in range(L):
        for j, kv in enumerate((cache.layers[i].keys, cache.layers[i].values)):
            assert max_abs(run.last[1 + 2 * i + j], kv.numpy()) <= 1e-5


def test_llama_left_padded_batch(llama):
    base, ad, out = llama
    _check_steps(out / "model.onnx", base, ad, _inputs(2, 8, seed=3, left_pad=(0, 3)), [6, 7, 8])


def test_whole_sequence_in_one_step_with_empty_past(llama):
    base, ad, out = llama
    _check_steps(out / "model.onnx", base, ad, _inputs(2, 9, seed=4), [9])


def test_multi_lora_with_past():
    base, ad = _make("llama")
    out = export_kw(base, [(ad, 1.0)], with_past=True, multi_lora=True)
    f = _inputs(2, 8, seed=5, left_pad=(2, 0))
    _check_steps(out / "model.onnx", base, ad, f, [6, 7, 8], onnx_adapter=out / "adapters" / "lora.onnx_adapter")
    _check_steps(out / "model.onnx", base, None, f, [6, 7, 8], tol=1e-5)
    from loraport.parity import validate

    rep = validate(out, base, [ad], provider="cpu", seq=9)  # each case ("none", "lora") stepped with its adapter
    assert rep["passed"] and [c["case"] for c in rep["cases"]] == ["none", "lora"]


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_family_with_past(family):
    """GPT-2: learned absolute positions (so left padding needs the position_ids fed); Qwen2: tied head."""
    base, ad = _make(family)
    out = export_kw(base, [(ad, 1.0)], with_past=True)
    f = _inputs(2, 8, seed=6, left_pad=(0, 2))
    assert max_abs(_reference(base, ad, f)[0], _reference(base, None, f)[0]) > 1e-3
    _check_steps(out / "model.onnx", base, ad, f, [5, 6, 7, 8])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "phi3", "gemma", "qwen3"])
def test_more_families_with_past(family):
    base, ad = _make(family)
    out = export_kw(base, [(ad, 1.0)], with_past=True)
    _check_steps(out / "model.onnx", base, ad, _inputs(2, 8, seed=7, left_pad=(0, 2)), [6, 7, 8])


@pytest.mark.slow
def test_int8_with_past_steps_equal_one_shot():
    base, ad = _make("llama")
    out = export_kw(base, [(ad, 1.0)], with_past=True, quantize="int8")
    f = _inputs(2, 8, seed=8)
    steps = _Ort(out / "model.onnx").steps(f, [6, 7, 8])
    assert max_abs(steps, _Ort(out / "model.onnx").steps(f, [8])) <= 1e-5
    ref, _ = _reference(base, ad, f)
    assert max_abs(steps, ref) <= 0.25 * max(1.0, float(np.abs(ref).max()))  # validate's int8 bound


def test_validate_runs_with_past_graph_step_by_step(llama):
    from loraport.parity import WITH_PAST_NOTE, validate

    base, ad, out = llama
    rep = validate(out, base, [ad], provider="cpu", seq=10)
    assert rep["passed"] and WITH_PAST_NOTE in rep["notes"]
    assert rep["cases"][0]["outputs"]["logits"]["max_abs"] <= 1e-4
    # and it does compare something: a reference with the adapter at half weight fails
    bad = validate(out, base, [(ad, 0.5)], provider="cpu", seq=10)
    assert not bad["passed"] and bad["cases"][0]["outputs"]["logits"]["max_abs"] > 1e-3


def test_cloning_refuses_a_past_that_leaves_its_layer():
    """Layer cloning copies layer 1's past inputs / present outputs; if the traced graph used layer 1's past
    anywhere outside layer 1 it must not clone (the full depth is traced instead)."""
    import copy

    import transformers
    from onnx import helper

    from loraport.onnx.capture import _capture
    from loraport.onnx.replicate import replicate_layers

    cfg = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 2}).to_dict()
    cap = _capture(cfg, "fp32", 20, None, with_past=True)
    ok = copy.deepcopy(cap)
    assert replicate_layers(ok, 4)
    assert ok.input_names[3:] == [f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    assert ok.output_names[1:] == [f"present.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    g = cap.proto.graph
    leak = next(n.output[0] for n in g.node if n.op_type == "Identity" and n.input[0] == "past_key_values.1.key")
    g.node.append(helper.make_node("Identity", [leak], ["leaked"]))
    g.output.append(helper.make_tensor_value_info("leaked", 1, None))
    before = cap.proto.SerializeToString()
    assert not replicate_layers(cap, 4)
    assert cap.proto.SerializeToString() == before and len(cap.input_names) == 3 + 4
