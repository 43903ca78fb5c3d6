"""Shared test setup: the repo root on sys.path, tiktoken's offline cache, one torch thread."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

# tiktoken downloads GPT-2's files on first use; offline we point it at the copy in ../shared.
_cache = os.path.join(SHARED, "data", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine
