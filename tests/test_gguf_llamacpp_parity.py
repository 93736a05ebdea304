"""llama.cpp itself as the consumer of loraport's GGUF adapters (issue #18): llama-cpp-python runs a base
converted by llama.cpp's own convert_hf_to_gguf.py with loraport's adapter (`lora_path=`), and its logits match
PEFT's merged model; without the adapter they do not. Slow (llama.cpp's converter and runtime per family, ~20 s
each); skipped unless llama_cpp is importable and LORAPORT_LLAMACPP points at a llama.cpp tree:

    LORAPORT_LLAMACPP=/path/to/llama.cpp LORAPORT_LLAMACPP_PYTHONPATH=/where/sentencepiece/is \
        pytest -m slow tests/test_gguf_llamacpp_parity.py

The work is bench/gguf_llamacpp_parity.py's (tolerances and their reasons are there).
"""

from __future__ import annotations

import pytest
from _gguf_arch_util import bench_script, llamacpp_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

BENCH = bench_script("gguf_llamacpp_parity")


@pytest.mark.parametrize("arch", list(BENCH.TOL))
def test_llamacpp_runs_loraport_adapter_like_peft_merge(tmp_path, arch):
    r = BENCH.run(arch, llamacpp_or_skip(), tmp_path)
    tol = BENCH.TOL[arch]
    assert r["with"] <= tol, r
    # the controls: a dropped adapter, or one applied at half its scale, shows far above the tolerance
    assert min(r["without"], r["half"]) >= 100 * tol, r
