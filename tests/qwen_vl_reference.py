"""The committed Qwen-VL (v1) golden files and where the official reference lives.

tests/golden/qwen_vl/ holds a tiny random-weight Qwen-VL checkpoint in the official layout (model/) and
the official remote code's outputs on it (golden.npz), written by tests/golden/qwen_vl/make_golden.py.
They let the JAX port be tested on a fresh clone without torch. The torch reference that regenerates
them (../shared/refs/qwen_vl_v1, or $JAXFLOW_QWEN_VL_REFS) is optional: see refs_available().
"""
from __future__ import annotations

import functools
import importlib
import os

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
GOLDEN_DIR = os.path.join(TESTS, "golden", "qwen_vl")
MAKE_GOLDEN = os.path.join(GOLDEN_DIR, "make_golden.py")
DEFAULT_REFS = os.path.join(REPO, "..", "shared", "refs", "qwen_vl_v1")

# token conventions of the tiny model (vocab 512): the image ids are the last three ids, pad = eod = 508
IMG_START, IMG_END, IMG_PAD, PAD = 509, 510, 511, 508
N_QUERIES = 256
SEQ_LENGTH = 320


@functools.lru_cache(maxsize=1)
def golden() -> dict:
    """golden.npz as a dict of numpy arrays (loaded once per process; do not modify them)."""
    with np.load(os.path.join(GOLDEN_DIR, "golden.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def model_dir() -> str:
    """The tiny official-layout checkpoint: config.json, model.safetensors and the licence files."""
    return os.path.join(GOLDEN_DIR, "model")


def refs_dir() -> str:
    """The offline Qwen-VL v1 reference folder (reference.py + the official remote code)."""
    return os.path.abspath(os.environ.get("JAXFLOW_QWEN_VL_REFS") or DEFAULT_REFS)


def refs_available() -> bool:
    """True when the reference folder exists and what make_golden.py needs imports."""
    if not os.path.isfile(os.path.join(refs_dir(), "reference.py")):
        return False
    for mod in ("torch", "tiktoken", "einops", "transformers", "safetensors"):
        try:
            importlib.import_module(mod)
        except Exception:
            return False
    return True
