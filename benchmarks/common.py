"""Shared pieces of jaxflow's benchmarks: the bench model config, model builders, inputs, timing, memory.

The "bench config" is a LLaVA-1.5-shaped model scaled down in width so that it runs on a 2-core CPU
while keeping the structure that matters for speed: 32 decoder layers, 576 image tokens per image
(CLIP at 336 px, patch 14, feature layer -2, strategy "default"), a 32064-token vocabulary.

    decoder  Llama, 32 layers, hidden 256, 8 heads (head_dim 32), 8 kv heads, MLP 688, vocab 32064
    vision   CLIP, 336 px, patch 14 (24x24 grid), hidden 256, 4 layers, 8 heads, MLP 1024
    image_token_id 32000

Weights are random (no download ever). `build_torch_model` makes the transformers model,
`build_jaxflow_model` pushes the same weights through the real converter (save_pretrained ->
jaxflow.convert_checkpoint -> jaxflow.load), so both frameworks hold identical parameters.

Peak memory of one framework is only meaningful in a process that holds nothing else:
`run_isolated(fn, *args)` runs `fn` in a fresh 'spawn' subprocess and returns its result together
with that child's own peak RSS, so several frameworks can be measured side by side in one run.
Nothing here imports jax or torch at module level, so thread settings (`set_threads`) can be applied
before either initialises.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import resource
import statistics
import time

import numpy as np

IMAGE_TOKEN_ID = 32000
VOCAB_SIZE = 32064
IMAGE_SIZE = 336
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576 ("default" strategy drops CLS)
SYSTEM_PREFIX_LEN = 8  # BOS + a few "system" tokens before the image block
TORCH_SEED = 0

TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=32,
            num_attention_heads=8, num_key_value_heads=8, head_dim=32, max_position_embeddings=4096,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
VISION = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=256, num_hidden_layers=4,
              num_attention_heads=8, intermediate_size=1024, projection_dim=256, hidden_act="quick_gelu")
TOP = dict(image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
           projector_hidden_act="gelu", tie_word_embeddings=False)


# --------------------------------------------------------------------------- config and models


def bench_hf_config(**overrides):
    """The bench `transformers.LlavaConfig`. Overrides: `text=dict(...)`, `vision=dict(...)`, or any
    top-level LlavaConfig field (e.g. `bench_hf_config(text=dict(num_hidden_layers=4))`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = {**TEXT, **overrides.pop("text", {})}
    vision = {**VISION, **overrides.pop("vision", {})}
    top = {**TOP, **overrides}
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision).to_dict(),
                       text_config=LlamaConfig(**text).to_dict(), **top)


def build_torch_model(attn_implementation: str = "sdpa", seed: int = TORCH_SEED, **config_overrides):
    """transformers LlavaForConditionalGeneration with random weights (fixed torch seed), eval mode, fp32."""
    import torch
    from transformers import LlavaForConditionalGeneration

    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(bench_hf_config(**config_overrides),
                                                       attn_implementation=attn_implementation,
                                                       dtype=torch.float32)
    return model.eval()


def save_torch_model(torch_model, hf_dir: str) -> str:
    """save_pretrained (safetensors) into hf_dir; returns hf_dir."""
    torch_model.save_pretrained(hf_dir)
    return hf_dir


def convert_to_jaxflow(hf_dir: str, ckpt_dir: str, dtype: str = "float32") -> str:
    """The real converter (what scripts/convert_checkpoint.py runs), overwriting ckpt_dir."""
    import jaxflow

    return jaxflow.convert_checkpoint(hf_dir, ckpt_dir, dtype, overwrite=True, progress=False)


def build_jaxflow_model(torch_model, workdir: str, dtype: str = "float32"):
    """Same weights in jaxflow: save_pretrained into workdir/hf, convert to workdir/jaxflow, load."""
    import jaxflow

    hf_dir = save_torch_model(torch_model, os.path.join(workdir, "hf"))
    ckpt = convert_to_jaxflow(hf_dir, os.path.join(workdir, "jaxflow"), dtype)
    return jaxflow.load(ckpt)


def load_torch_model(hf_dir: str, attn_implementation: str):
    """The saved bench model back in torch (fp32, eval) with the given attention implementation."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, attn_implementation=attn_implementation,
                                                          dtype=torch.float32)
    return model.eval()


# --------------------------------------------------------------------------- inputs


def bench_inputs(batch: int = 4, text_tokens: int = 64, seed: int = 0):
    """numpy inputs: input_ids (B, 576 + text_tokens) int64 = [BOS, 7 system tokens, 576 image tokens,
    the rest text], attention_mask (B, T) int64 all ones, pixel_values (B, 3, 336, 336) float32.
    Text ids avoid the image token and the special ids 0..2. text_tokens must be > SYSTEM_PREFIX_LEN."""
    if text_tokens <= SYSTEM_PREFIX_LEN:
        raise ValueError(f"text_tokens must exceed the {SYSTEM_PREFIX_LEN}-token system prefix")
    rng = np.random.RandomState(seed)
    t = NUM_IMAGE_TOKENS + text_tokens
    ids = rng.randint(3, IMAGE_TOKEN_ID, size=(batch, t)).astype(np.int64)
    ids[:, 0] = TEXT["bos_token_id"]
    ids[:, SYSTEM_PREFIX_LEN:SYSTEM_PREFIX_LEN + NUM_IMAGE_TOKENS] = IMAGE_TOKEN_ID
    mask = np.ones((batch, t), np.int64)
    pixels = rng.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)
    return ids, mask, pixels


# --------------------------------------------------------------------------- threads, timing, memory


def xla_thread_flags(threads: int) -> str:
    """The XLA_FLAGS fragment for `threads`. `--xla_cpu_multi_thread_eigen` is a real XLA flag; the bare
    `intra_op_parallelism_threads=N` is the conventional companion (XLA's flag parser skips tokens
    without a leading `--`, so it documents intent but is not what bounds the thread count)."""
    return f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"


def set_threads(threads: int) -> dict:
    """Apply the same thread budget to this process (and the children it spawns later): CPU affinity to
    the first `threads` cores (what actually bounds XLA's CPU thread pool), XLA_FLAGS, OMP/MKL env vars
    (read by torch at import) and, if torch is already imported, torch.set_num_threads. Call before
    importing jax. Returns what was set."""
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise ValueError(f"{threads} threads requested but only {len(cores)} cores are available")
    os.sched_setaffinity(0, cores[:threads])
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith(("--xla_cpu_multi_thread_eigen",
                                                                    "intra_op_parallelism_threads")))
    os.environ["XLA_FLAGS"] = (flags + " " + xla_thread_flags(threads)).strip()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return {"threads": threads, "cpu_affinity": cores[:threads], "XLA_FLAGS": os.environ["XLA_FLAGS"],
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# glibc malloc serves every block above M_MMAP_THRESHOLD (at most 32 MiB when adjusted dynamically)
# with a fresh mmap and gives it back on free, so each large temporary (e.g. a 4x8x640x640 float32
# attention-score tensor, 52 MiB) is page-faulted in again on every call: on the benchmark VM that
# made an elementwise op on such a tensor ~8x slower than on reused memory, in jax and torch alike.
# These settings (read by glibc at process start) keep freed memory in the heap for reuse instead.
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def _block(out):
    if "jax" in __import__("sys").modules:
        import jax

        jax.block_until_ready(out)
    return out


def timeit(fn, warmup: int = 1, repeats: int = 5, *, return_all: bool = False):
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs (jax outputs are blocked on).
    With return_all=True returns (median, [times])."""
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return (med, times) if return_all else med


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(fn, args, kwargs):
    result = fn(*args, **kwargs)
    return result, peak_rss_mb()


class IsolatedWorker:
    """One fresh 'spawn' subprocess that stays alive across calls, so a framework can load its model
    once and be timed in rounds interleaved with other frameworks' workers (fairer under background
    load than timing each framework in one block). `call` runs a module-level function there and
    returns its result; module globals of the child persist between calls. `peak_rss_mb()` is the
    child's own ru_maxrss. Use as a context manager or call `close()`."""

    def __init__(self, env: dict | None = None):
        """env: extra environment variables for the child only (e.g. `TUNED_MALLOC_ENV`)."""
        ctx = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        self._env = dict(env or {})
        self._started = False

    def call(self, fn, *args, **kwargs):
        if self._started:
            return self._pool.submit(fn, *args, **kwargs).result()
        saved = {k: os.environ.get(k) for k in self._env}
        os.environ.update(self._env)  # the child process is spawned on the first submit
        try:
            fut = self._pool.submit(fn, *args, **kwargs)
            self._started = True
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return fut.result()

    def peak_rss_mb(self) -> float:
        return self.call(peak_rss_mb)

    def close(self):
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_isolated(fn, *args, **kwargs):
    """Runs fn(*args, **kwargs) in a fresh 'spawn' subprocess; returns (result, child peak RSS MiB).
    `fn` must be importable (a module-level function); result must be picklable. The child inherits
    this process's environment and CPU affinity, so call `set_threads` first."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_child, fn, args, kwargs).result()
