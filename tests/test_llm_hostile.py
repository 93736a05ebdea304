"""Mutated LLM adapter files (GGUF, MLX, torchtune, .onnx_adapter): every read ends in a LoraportError or a
valid adapter — never another exception. Bounded runs here; `LORAPORT_FUZZ=5000` for a longer one by hand."""

from __future__ import annotations

import os
import random
import shutil
import zlib
from pathlib import Path

import pytest

from loraport.errors import LoraportError
from loraport.formats import load_adapter
from tests._llm_util import LLM

N = int(os.environ.get("LORAPORT_FUZZ", "150"))


@pytest.mark.parametrize("fmt,src,head", [
    ("gguf", "gguf/llama_embed.gguf", 2000),
    ("onnx-adapter", "onnx/llama_lora.onnx_adapter", 20000),
    ("mlx", "mlx/llama_dora/adapters.safetensors", 600),
    ("mlx", "mlx/llama_dora/adapter_config.json", 400),
    ("torchtune", "torchtune/llama_lora/adapter_model.pt", 30000),
])
def test_mutated_files_fail_cleanly(tmp_path, fmt, src, head):
    rng = random.Random(zlib.crc32(f"{fmt}|{src}".encode()))  # the same mutations in every run (hash() is salted)
    srcp = LLM / src
    if fmt in ("mlx", "torchtune"):
        folder = tmp_path / "ad"
        shutil.copytree(srcp.parent, folder)
        dest, target = folder / srcp.name, folder
    else:
        dest = target = tmp_path / srcp.name
    data = srcp.read_bytes()
    outcomes = {"error": 0, "ok": 0}
    for _ in range(N):
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(min(len(b), head) if rng.random() < 0.8 else len(b))
            b[pos] = rng.randrange(256)
        if rng.random() < 0.2:
            b = b[: rng.randrange(len(b))]
        Path(dest).write_bytes(bytes(b))
        try:
            load_adapter(target, format=fmt)
            outcomes["ok"] += 1
        except LoraportError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 0  # the mutations do hit the parser
