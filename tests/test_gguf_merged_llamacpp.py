"""llama.cpp runs a GGUF base merged by loraport (issue #19): F32 / F16 / Q8_0 bases from llama.cpp's own
convert_hf_to_gguf.py, Q4_0 / Q4_K_M from llama.cpp's own quantizer; the merged file's logits in llama-cpp-python
are within the type's quantization error of the unmerged base + adapter (`lora_path`) and of PEFT's merged
model, types (or a k-quant's fallback) and metadata unchanged, codes those of gguf.quants. Slow (~3 min: two
conversions per type and 4 llama.cpp runs each); skipped unless llama_cpp is importable and LORAPORT_LLAMACPP
points at a llama.cpp tree:

    LORAPORT_LLAMACPP=/path/to/llama.cpp LORAPORT_LLAMACPP_PYTHONPATH=/where/sentencepiece/is \
        pytest -m slow tests/test_gguf_merged_llamacpp.py

The work and the tolerances' reasons are bench/gguf_merged_llamacpp.py's.
"""

from __future__ import annotations

import pytest
from _gguf_arch_util import bench_script, llamacpp_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

BENCH = bench_script("gguf_merged_llamacpp")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return BENCH.run(llamacpp_or_skip(), tmp_path_factory.mktemp("merged"))


@pytest.mark.parametrize("qtype", BENCH.TYPES)
def test_merged_gguf_runs_in_llamacpp_like_base_plus_lora(rows, qtype):
    r = rows[qtype]
    assert BENCH.failures(r) == [], r
    assert r["layout"] and r["metadata"] and r["wrong_tensors"] == 0
    assert r["codes_checked"] == 14 and r["codes_equal_min"] >= 0.995, r
    if qtype == "F32":  # no quantization: the merge is llama.cpp's own unmerged run to f32 rounding
        assert r["merged_vs_lora"][1] <= 1e-5 and r["merged_vs_peft"][1] <= 1e-5, r
    if qtype == "Q4_K_M":  # updated k-quants keep their type; codes checked against libggml's quantizer
        assert r["kept"] == 21 and r["fell_back"] == 0, r
