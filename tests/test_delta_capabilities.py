"""Delta classes own their capabilities (issue 16): each delta's low-rank form, dense ΔW and in-place
application agree with each other, and no module outside the delta classes probes deltas by type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from loraport.adapter import Delta, FullDelta, LoraDelta, ReplaceDelta
from loraport.deltas_experts import ExpertPart, ExpertsLoraDelta
from loraport.deltas_lycoris import Ia3Delta, LohaDelta, LokrDelta
from loraport.deltas_peft import MissDelta, OrthoDelta, VeraDelta, boft_blocks, oft_blocks

PKG = Path(__file__).resolve().parent.parent / "loraport"
DELTA_MODULES = {"adapter.py", "deltas_lycoris.py", "deltas_experts.py", "deltas_peft.py"}
# type tests, attribute probes and kind lists on a delta (`d` / `delta`) anywhere outside the delta classes
PROBE = re.compile(r"isinstance\([^)]*Delta|getattr\([^)]*\bd(elta)?\b|hasattr\(d(elta)?\b|\.kind in \(|"
                   r"\bd\.kind [!=]= ")


def _g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def _deltas() -> dict[str, Delta]:
    return {
        "lora": LoraDelta("w", A=_g(3, 6), B=_g(5, 3), scale=0.5),
        "lora-t": LoraDelta("w", A=_g(3, 5), B=_g(6, 3), scale=2.0, transpose=True),
        "dora": LoraDelta("w", A=_g(3, 6), B=_g(5, 3), magnitude=_g(5).abs() + 1),
        "tucker": LoraDelta("w", A=_g(3, 6), B=_g(5, 3), mid=_g(3, 3)),
        "loha": LohaDelta("w", w1a=_g(5, 2), w1b=_g(2, 6), w2a=_g(5, 2, seed=1), w2b=_g(2, 6, seed=1), scale=0.3),
        "lokr": LokrDelta("w", w1=_g(1, 2), w2=_g(5, 3), scale=0.7),
        "ia3": Ia3Delta("w", vector=_g(5)),
        "full": FullDelta("w", diff=_g(5, 6), scale=1.5),
        "replace": ReplaceDelta("w", value=_g(5, 6, seed=3)),
        "oft": OrthoDelta("w", blocks=oft_blocks(_g(2, 3), 3, neumann=True, terms=5, coft=False, eps=0.0)),
        "boft": OrthoDelta("w", blocks=boft_blocks(_g(1, 2, 3, 3)), out_scale=_g(5, 1), method="boft"),
        "vera": VeraDelta("w", A=_g(3, 8), B=_g(7, 3), lambda_b=_g(5), lambda_d=_g(3)),
        "miss": MissDelta("w", block=_g(4, 5)),
        "miss-bat": MissDelta("w", block=_g(5, 1, 1), mode="bat"),
    }


PLAIN = {"lora", "lora-t", "vera"}  # VeRA resolves into a plain LoRA once the base gives the input width


@pytest.mark.parametrize("name", sorted(_deltas()))
def test_dense_apply_and_low_rank_form_agree(name):
    d = _deltas()[name]
    W = _g(5, 6, seed=7)
    d = d.resolve(tuple(W.shape))
    D = d.dense("cpu", W)
    assert D.shape == W.shape
    W2 = W.clone()
    d.apply_(W2, 0.25)
    torch.testing.assert_close(W2, W + 0.25 * D, rtol=1e-5, atol=1e-5)
    f = d.low_rank_factors()
    assert (f is not None) == (name in PLAIN) == d.plain_lora
    if f is not None:
        P = f.scale * (f.B @ f.A)
        torch.testing.assert_close(P.t() if f.transpose else P, D, rtol=1e-5, atol=1e-5)
    assert d.replaces_base == (name == "replace")
    assert d.has_magnitude == (name == "dora")
    assert d.label == ("DoRA" if name == "dora" else d.kind)
    if not d.depends_on_base:  # without a base the same ΔW comes from the delta alone
        torch.testing.assert_close(d.dense("cpu"), D)


def test_thin_factors_reproduce_every_lora_but_nothing_else():
    for name, d in _deltas().items():
        tf = d.thin_factors()
        assert (tf is not None) == d.has_lora_factors == name.startswith(("lora", "dora", "tucker"))
        if tf is not None and not d.has_magnitude:
            d = d.resolve((5, 6))
            P = tf[0] @ tf[1]
            torch.testing.assert_close(P.t() if d.transpose else P, d.dense("cpu", torch.zeros(5, 6)),
                                       rtol=1e-5, atol=1e-5)


def test_stacked_experts_have_no_single_matrix_form():
    d = ExpertsLoraDelta("e", parts=[ExpertPart(A=_g(2, 3, 4), B=_g(2, 5, 3))])
    assert d.stacked and not d.plain_lora and d.low_rank_factors() is None and d.thin_factors() is None
    W = torch.zeros(2, 5, 4)
    torch.testing.assert_close(d.dense("cpu", W), torch.einsum("eor,eri->eoi", d.parts[0].B, d.parts[0].A))


def test_nonfinite_check_sees_every_delta_kind_including_stacked_experts():
    """The NaN/Inf check reads `named_tensors()`: a NaN in any stored factor is found, also in the parts of a
    stacked-experts LoRA (whose factors are not fields of the delta)."""
    from loraport.adapter import Adapter
    from loraport.errors import BadInputError
    from loraport.finite import check_adapters

    cases = {**_deltas(), "experts": ExpertsLoraDelta("e", parts=[ExpertPart(A=_g(2, 3, 4), B=_g(2, 5, 3))])}
    for name, d in cases.items():
        ad = Adapter(path=f"{name}.safetensors", format="test", deltas=[d])
        assert check_adapters([(ad, 1.0)]) == [], name
        stored = d.named_tensors()
        assert stored, name
        stored[-1][1].view(-1)[0] = float("nan")
        with pytest.raises(BadInputError, match="non-finite"):
            check_adapters([(ad, 1.0)], "fail")


def test_no_delta_probing_outside_the_delta_classes():
    hits = []
    for p in sorted(PKG.rglob("*.py")):
        if p.name in DELTA_MODULES:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if PROBE.search(line):
                hits.append(f"{p.relative_to(PKG)}:{i}: {line.strip()}")
    assert not hits, "probe the delta's capabilities instead:\n" + "\n".join(hits)
