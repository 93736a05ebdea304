"""Suite-wide setup: GPU tests skip cleanly without CUDA; tests never touch the network."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# merges remember their inputs' sha256 (loraport.manifest.HashCache): keep the suite's out of the user's cache
_CACHE = tempfile.mkdtemp(prefix="loraport-test-cache-")
os.environ.setdefault("LORAPORT_CACHE_DIR", _CACHE)
# the key that authenticates cache entries (loraport/cache_key.py) lives outside the cache: not the user's either
_KEYS = tempfile.mkdtemp(prefix="loraport-test-key-")
os.environ.setdefault("LORAPORT_KEY_FILE", os.path.join(_KEYS, "cache.key"))
# ONNX exports remember captured graphs (loraport.onnx.graph_cache): off for the suite, so every export test
# traces its own graph whatever ran before it; tests/test_graph_cache.py turns it on where it is the subject
os.environ.setdefault("LORAPORT_NO_GRAPH_CACHE", "1")
# progress lines (off a terminal: once a step has run 1 s) would make a slow machine's stderr differ from a fast
# one's; the suite asserts on stderr, so it runs without them; tests/test_cli_progress.py turns them back on
os.environ.setdefault("LORAPORT_NO_PROGRESS", "1")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
    shutil.rmtree(_KEYS, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
