"""The device check: jaxflow against transformers torch on one GPU, LLaVA-1.5-7B shape, bf16, one run.

    bash benchmarks/gpu/run.sh                       # on the GPU machine (writes $OUT/gpu.json or
                                                     # benchmarks/results/gpu.json)
    python benchmarks/gpu/bench_gpu.py --scale tiny  # a dry run of every code path on CPU

One process, no downloads. torch builds LlavaForConditionalGeneration from a LLaVA-1.5-7B-shaped
config (CLIP ViT-L/14-336, 24 layers of 1024; Llama 32 layers of 4096, MLP 11008, vocab 32064) with
random weights in bf16 straight on the GPU (sdpa attention); `jaxflow.from_state_dict` takes the same
tensors through DLPack (no copy through the host, no files). Then, each phase timed side by side:

  matmul      the bf16 8192^3 matmul rate in jax (this card's practical ceiling)
  forward     prefill of B rows x (8 + 576 image + text) tokens, all logits: jaxflow (attention
              "xla", "cudnn", and "fused" = the default, cuDNN where it applies) vs torch sdpa;
              tokens/s, MFU, logits agreement, peak memory
  sweep       `jaxflow.truncation_sweep`, all 33 cut layers, against 33 torch forwards (the least a
              per-K torch loop needs)
  reference   bf16 logits of torch sdpa and of jaxflow against torch in float32 (same weights)
  sweep_detail  the sweep's jit program alone (device time) and with the logits copied to the host
  generate    `jaxflow.truncation_generate` (what evaluate.py runs), 33 cut layers x 8 new tokens, at
              8 and 32 rows; projected POPE x 33 cut layers
  cam         `jaxflow.llava_cam` (every layer's map, one forward + one backward) vs the same maps in
              torch autograd (zero deltas at every layer's MLP input, one backward); agreement

MFU counts the useful matmul FLOPs (vision layers up to the selected one, projector, decoder with
causal attention counted as half the square, LM head) over the datasheet dense bf16 peak of the
H100/H200 SXM (989 TFLOP/s); `mfu_vs_matmul` divides by the measured matmul rate instead. Every
phase appends to the JSON as it ends, so a run stopped at its limit still reports what it measured;
a phase that fails records its error and the next one runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and jax share the card
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

PEAK_BF16_TFLOPS = 989.4  # H100 / H200 SXM dense bf16, datasheet
POPE_QUESTIONS = 8910
IMAGE_TOKEN_ID = 32000
SCALES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2 shape)
    "7b": dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32),
               vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768)),
    # the same structure, small enough for a CPU dry run
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4),
                 vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             image_size=56, patch_size=14, projection_dim=64)),
}


def hf_config(scale: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    s = SCALES[scale]
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **s["text"])
    vision = CLIPVisionConfig(hidden_act="quick_gelu", **s["vision"])
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN_ID,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=False)


def inputs(cfg, batch: int, text_tokens: int, answer_tokens: int = 0, seed: int = 0):
    """ids/mask (B, T) int64: [BOS, 7 system, N image, text (+ answer)], pixels (B, 3, S, S) float32."""
    v = cfg.vision_config
    n = (v.image_size // v.patch_size) ** 2
    rng = np.random.RandomState(seed)
    t = 8 + n + text_tokens + answer_tokens
    ids = rng.randint(3, IMAGE_TOKEN_ID, size=(batch, t)).astype(np.int64)
    ids[:, 0] = 1
    ids[:, 8:8 + n] = IMAGE_TOKEN_ID
    amask = np.zeros((batch, t), bool)
    if answer_tokens:
        amask[:, t - answer_tokens:] = True
    px = rng.randn(batch, 3, v.image_size, v.image_size).astype(np.float32)
    return ids, np.ones((batch, t), np.int64), px, amask


def forward_flops(cfg, batch: int, seq: int) -> float:
    """Useful matmul FLOPs of one prefill (all logits): vision layers up to the selected one, projector,
    decoder (causal attention: half the square), LM head."""
    v, t = cfg.vision_config, cfg.text_config
    nv = (v.image_size // v.patch_size) ** 2 + 1
    dv, fv = v.hidden_size, v.intermediate_size
    vl = v.num_hidden_layers + 1 + cfg.vision_feature_layer if cfg.vision_feature_layer < 0 else cfg.vision_feature_layer
    vision = 2 * (nv - 1) * 3 * v.patch_size ** 2 * dv + vl * (2 * nv * (4 * dv * dv + 2 * dv * fv) + 4 * nv * nv * dv)
    d, f = t.hidden_size, t.intermediate_size
    kv = d * t.num_key_value_heads // t.num_attention_heads
    proj = 2 * (nv - 1) * (dv * d + d * d)
    per_layer = 2 * seq * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * seq * seq * d
    return float(batch * (vision + proj + t.num_hidden_layers * per_layer + 2 * seq * d * t.vocab_size))


def med_time(fn, sync, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class Report:
    def __init__(self, path: str):
        self.path, self.data, self.t0 = path, {"phases": {}, "errors": {}}, time.perf_counter()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def put(self, phase: str, **fields):
        self.data["phases"].setdefault(phase, {}).update(fields)
        self.flush()
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {phase}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()), flush=True)

    def error(self, phase: str, e: BaseException):
        self.data["errors"][phase] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
        self.flush()

    def flush(self):
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2)
        os.replace(tmp, self.path)


def torch_cam(model, ids, mask, px, amask, n_image: int):
    """All-layer 'paper' LLaVA-CAM in torch autograd: a zero delta added to every decoder layer's MLP
    input (post_attention_layernorm output), score = sum of answer-token logits, one backward.
    Returns (L, B, N) float32 maps normalised per layer."""
    import torch

    layers = [m for name, m in model.named_modules() if name.endswith("post_attention_layernorm")
              and "language_model" in name]
    b, t = ids.shape
    d = model.config.text_config.hidden_size
    delta = torch.zeros(len(layers), b, t, d, dtype=model.dtype, device=ids.device, requires_grad=True)
    acts = [None] * len(layers)

    def hook(i):
        def f(_mod, _inp, out):
            acts[i] = out.detach()
            return out + delta[i]
        return f

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False).logits
        pos = amask.nonzero(as_tuple=True)  # answer token positions p; target logit at p - 1
        score = logits[pos[0], pos[1] - 1, ids[pos]].float().sum()
        score.backward()
    finally:
        for h in handles:
            h.remove()
    img = ids == IMAGE_TOKEN_ID  # (B, T)
    g = delta.grad.float()[:, img].reshape(len(layers), b, n_image, d)
    h = torch.stack(acts).float()[:, img].reshape(len(layers), b, n_image, d)
    alpha = torch.relu(g).mean(dim=2, keepdim=True)
    raw = torch.relu((alpha * h).mean(dim=-1))  # (L, B, N)
    mx = raw.amax(dim=-1, keepdim=True)
    return torch.where(mx > 0, raw / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(raw))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="7b")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "gpu.json"))
    ap.add_argument("--batch", type=int, default=8, help="forward rows")
    ap.add_argument("--text_tokens", type=int, default=56, help="text tokens per forward row after the image")
    ap.add_argument("--sweep_batch", type=int, default=8)
    ap.add_argument("--sweep_text", type=int, default=24, help="tokens after the image in a sweep row (a POPE "
                    "question and the assistant prefix are about this long)")
    ap.add_argument("--cam_text", type=int, default=24)
    ap.add_argument("--cam_answer", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget_s", type=float, default=420, help="skip phases that would start after this")
    ap.add_argument("--phases", default="matmul,forward,reference,sweep,sweep_detail,generate,cam")
    args = ap.parse_args(argv)
    rep = Report(args.out)
    phases = args.phases.split(",")

    import jax
    import jax.numpy as jnp
    import torch

    import jaxflow

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    jdev = jax.devices()[0]
    rep.put("env", jax=jax.__version__, torch=torch.__version__, backend=jax.default_backend(),
            device=str(getattr(jdev, "device_kind", jdev)), torch_device=torch.cuda.get_device_name() if dev == "cuda"
            else "cpu", python=platform.python_version(), scale=args.scale)
    import transformers

    rep.put("env", transformers=transformers.__version__)

    def tsync(x):
        if dev == "cuda":
            torch.cuda.synchronize()
        return x

    jsync = jax.block_until_ready

    def jax_peak_gib():
        stats = jdev.memory_stats() or {}
        return round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)

    def left():
        return args.budget_s - (time.perf_counter() - rep.t0)

    # ---------------------------------------------------------------- matmul ceiling
    if "matmul" in phases:
        try:
            n = 8192 if args.scale == "7b" else 512
            a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
            mm = jax.jit(lambda x, y: x @ y)
            sec, _ = med_time(lambda: mm(a, a), jsync, 10, warmup=3)
            rep.put("matmul", n=n, tflops=2 * n ** 3 / sec / 1e12)
            del a
        except Exception as e:  # noqa: BLE001
            rep.error("matmul", e)
    matmul_tflops = rep.data["phases"].get("matmul", {}).get("tflops")

    # ---------------------------------------------------------------- models
    from transformers import LlavaForConditionalGeneration

    cfg = hf_config(args.scale)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        tm = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    tm.eval().requires_grad_(False)
    tsync(None)
    n_params = sum(p.numel() for p in tm.parameters())
    rep.put("models", torch_build_s=time.perf_counter() - t0, params_b=n_params / 1e9)
    t0 = time.perf_counter()
    jm = jaxflow.from_state_dict(tm.config, tm.state_dict(), "bfloat16")
    jsync(jax.tree.leaves(jax.tree.map(lambda x: x, __import__("flax").nnx.state(jm))))
    rep.put("models", jaxflow_from_state_dict_s=time.perf_counter() - t0, jax_peak_gib=jax_peak_gib(),
            torch_alloc_gib=round(torch.cuda.memory_allocated() / 2**30, 2) if dev == "cuda" else 0.0)
    n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2

    def torch_forward(ids, mask, px):
        with torch.inference_mode():
            return tm(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False).logits

    def to_torch(*arrays):
        return [torch.from_numpy(a).to(dev) if a.dtype != np.float32 else torch.from_numpy(a).to(dev, torch.bfloat16)
                for a in arrays]

    # ---------------------------------------------------------------- forward
    if "forward" in phases and left() > 0:
        try:
            ids, mask, px, _ = inputs(cfg, args.batch, args.text_tokens)
            b, t = ids.shape
            flops = forward_flops(cfg, b, t)
            tids, tmask, tpx = to_torch(ids, mask, px)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t_sec, _ = med_time(lambda: torch_forward(tids, tmask, tpx), tsync, args.repeats)
            tlog = torch_forward(tids, tmask, tpx).float()
            rep.put("forward", rows=b, seq=t, tokens=b * t, gflop=flops / 1e9, torch_sdpa_s=t_sec,
                    torch_tokens_per_s=b * t / t_sec, torch_mfu=flops / t_sec / 1e12 / PEAK_BF16_TFLOPS,
                    torch_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else 0.0)
            for impl in ("xla", "cudnn", "fused"):
                try:
                    c0 = time.perf_counter()
                    jsync(jaxflow.forward(jm, ids, px, mask, attn_impl=impl).logits)
                    compile_s = time.perf_counter() - c0
                    j_sec, _ = med_time(lambda: jaxflow.forward(jm, ids, px, mask, attn_impl=impl).logits, jsync,
                                        args.repeats, warmup=0)
                    jlog = torch.from_dlpack(jaxflow.forward(jm, ids, px, mask, attn_impl=impl).logits)
                    diff = (jlog - tlog).abs()
                    fields = {f"{impl}_s": j_sec, f"{impl}_first_call_s": compile_s,
                              f"{impl}_tokens_per_s": b * t / j_sec,
                              f"{impl}_mfu": flops / j_sec / 1e12 / PEAK_BF16_TFLOPS,
                              f"{impl}_over_torch_sdpa": t_sec / j_sec,
                              f"{impl}_logits_max_abs_diff": float(diff.max()),
                              f"{impl}_logits_mean_abs_diff": float(diff.mean()),
                              f"{impl}_logits_torch_mean_abs": float(tlog.abs().mean()),
                              f"{impl}_top1_agree": float((jlog.argmax(-1) == tlog.argmax(-1)).float().mean()),
                              "jax_peak_gib": jax_peak_gib()}
                    if matmul_tflops:
                        fields[f"{impl}_mfu_vs_matmul"] = flops / j_sec / 1e12 / matmul_tflops
                    rep.put("forward", **fields)
                    del jlog, diff
                except Exception as e:  # noqa: BLE001
                    rep.error(f"forward_{impl}", e)
            del tlog
        except Exception as e:  # noqa: BLE001
            rep.error("forward", e)
    fwd = rep.data["phases"].get("forward", {})
    impls = [i for i in ("cudnn", "xla", "fused") if f"{i}_s" in fwd]
    impls_all = impls or ["fused"]
    best = "fused"  # the default, what users get: cuDNN where it applies

    # ---------------------------------------------------------------- bf16 against an fp32 reference
    if "reference" in phases and left() > 0:
        try:
            import copy

            ids, mask, px, _ = inputs(cfg, args.batch, args.text_tokens)
            tids, tmask, tpx = to_torch(ids, mask, px)
            ref_model = copy.deepcopy(tm).float()
            with torch.inference_mode():
                ref = ref_model(input_ids=tids, attention_mask=tmask, pixel_values=tpx.float(), use_cache=False).logits
            del ref_model
            ref_top = ref.argmax(-1)
            fields = {"reference_mean_abs": float(ref.abs().mean())}
            cands = {"torch_sdpa_bf16": lambda: torch_forward(tids, tmask, tpx).float()}
            for impl in impls_all:
                cands[f"jaxflow_{impl}_bf16"] = lambda impl=impl: torch.from_dlpack(
                    jaxflow.forward(jm, ids, px, mask, attn_impl=impl).logits)
            for name, fn in cands.items():
                got = fn()
                d = (got - ref).abs()
                fields.update({f"{name}_max_abs_err": float(d.max()), f"{name}_mean_abs_err": float(d.mean()),
                               f"{name}_top1_agree": float((got.argmax(-1) == ref_top).float().mean())})
                del got, d
            del ref
            if dev == "cuda":
                torch.cuda.empty_cache()
            rep.put("reference", **fields)
        except Exception as e:  # noqa: BLE001
            rep.error("reference", e)

    # ---------------------------------------------------------------- sweep
    if "sweep" in phases and left() > 0:
        try:
            ids, mask, px, _ = inputs(cfg, args.sweep_batch, args.sweep_text)
            b, t = ids.shape
            L = cfg.text_config.num_hidden_layers
            tids, tmask, tpx = to_torch(ids, mask, px)
            t_fwd, _ = med_time(lambda: torch_forward(tids, tmask, tpx), tsync, args.repeats)
            j_fwd, _ = med_time(lambda: jaxflow.forward(jm, ids, px, mask, attn_impl=best).logits, jsync, args.repeats)
            c0 = time.perf_counter()
            out = jaxflow.truncation_sweep(jm, ids, px, mask, attn_impl=best)
            compile_s = time.perf_counter() - c0
            s_sec, _ = med_time(lambda: jaxflow.truncation_sweep(jm, ids, px, mask, attn_impl=best).logits,
                                lambda x: x, max(2, args.repeats // 2), warmup=0)
            jaxflow.truncation_sweep(jm, ids, px, mask, attn_impl=best, all_logits=False)
            lean, _ = med_time(lambda: jaxflow.truncation_sweep(jm, ids, px, mask, attn_impl=best,
                                                                all_logits=False).last_logits,
                               lambda x: x, args.repeats, warmup=0)
            rep.put("sweep", rows=b, seq=t, variants=int(len(out.layers)), attn_impl=best, sweep_s=s_sec,
                    sweep_first_call_s=compile_s, logits_gib=round(out.logits.nbytes / 2**30, 3),
                    sweep_last_logits_only_s=lean, jaxflow_forward_s=j_fwd, torch_forward_s=t_fwd,
                    sweep_over_jaxflow_forward=s_sec / j_fwd, sweep_last_only_over_jaxflow_forward=lean / j_fwd,
                    torch_loop_lower_bound_s=(L + 1) * t_fwd, speedup_vs_torch_loop=(L + 1) * t_fwd / s_sec,
                    speedup_last_only_vs_torch_loop=(L + 1) * t_fwd / lean,
                    pope_x33_projected_min_sweep_last_only=POPE_QUESTIONS * lean / b / 60, jax_peak_gib=jax_peak_gib())
            del out
        except Exception as e:  # noqa: BLE001
            rep.error("sweep", e)

    # ---------------------------------------------------------------- the sweep's parts
    if "sweep_detail" in phases and left() > 0:
        try:
            from jaxflow.analysis import truncation as tr

            ids, mask, px, _ = inputs(cfg, args.sweep_batch, args.sweep_text)
            L = cfg.text_config.num_hidden_layers
            for chunks in (4, 8):
                if left() <= 0:
                    break
                i2, m2, ks, lay, images = tr._prepare(jm, ids, px, mask, None, 0, chunks, best)
                call = lambda: tr._sweep_jit(  # noqa: E731
                    jm, jnp.asarray(i2), images, jnp.asarray(m2), jnp.asarray(lay.text_idx),
                    jnp.asarray(lay.text_valid), jnp.asarray(lay.image_start), jnp.asarray(lay.image_end),
                    jnp.asarray(ks), prefix_len=lay.prefix_len, system_len=lay.system_len, image_max=lay.image_max,
                    chunks=tr._chunks(ks, L, chunks), keep_top_k=0, impl=best)
                jsync(call())
                d_sec, _ = med_time(call, jsync, args.repeats, warmup=0)
                h_sec, _ = med_time(lambda: np.asarray(call()["logits"]), lambda x: x, args.repeats, warmup=0)
                rep.put("sweep_detail", **{f"chunks{chunks}_device_s": d_sec, f"chunks{chunks}_with_host_copy_s": h_sec})
        except Exception as e:  # noqa: BLE001
            rep.error("sweep_detail", e)

    # ---------------------------------------------------------------- truncated generation (what evaluate.py runs)
    if "generate" in phases and left() > 0:
        try:
            for b in (8, 32):
                if left() <= 0:
                    break
                ids, mask, px, _ = inputs(cfg, b, args.sweep_text)
                run = lambda: jaxflow.truncation_generate(jm, ids, px, mask, max_new_tokens=8, eos_token_id=-1,  # noqa: E731
                                                          attn_impl=best).tokens
                c0 = time.perf_counter()
                run()
                compile_s = time.perf_counter() - c0
                g_sec, _ = med_time(run, lambda x: x, max(2, args.repeats // 2), warmup=0)
                rep.put("generate", **{f"b{b}_s": g_sec, f"b{b}_first_call_s": compile_s,
                                       f"b{b}_pope_x33_projected_min": POPE_QUESTIONS * g_sec / b / 60,
                                       "jax_peak_gib": jax_peak_gib()})
        except Exception as e:  # noqa: BLE001
            rep.error("generate", e)

    # ---------------------------------------------------------------- cam
    if "cam" in phases and left() > 0:
        try:
            ids, mask, px, amask = inputs(cfg, 1, args.cam_text, args.cam_answer)
            c0 = time.perf_counter()
            maps = jaxflow.llava_cam(jm, ids, px, amask, "paper", attention_mask=mask, attn_impl=best)
            compile_s = time.perf_counter() - c0
            j_sec, _ = med_time(lambda: jaxflow.llava_cam(jm, ids, px, amask, "paper", attention_mask=mask,
                                                          attn_impl=best), lambda x: x, args.repeats, warmup=0)
            j_fwd, _ = med_time(lambda: jaxflow.forward(jm, ids, px, mask, attn_impl=best).logits, jsync, args.repeats)
            tids, tmask, tpx = to_torch(ids, mask, px)
            tam = torch.from_numpy(amask).to(dev)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t_sec, _ = med_time(lambda: torch_cam(tm, tids, tmask, tpx, tam, n_image), tsync, args.repeats)
            tmaps = torch_cam(tm, tids, tmask, tpx, tam, n_image).cpu().numpy()[:, 0]  # (L, N)
            jmaps = maps[0].reshape(maps.shape[1], -1)  # (L, N)
            corr = [float(np.corrcoef(a, b_)[0, 1]) for a, b_ in zip(jmaps, tmaps) if a.std() > 0 and b_.std() > 0]
            rep.put("cam", layers=int(maps.shape[1]), attn_impl=best, cam_s=j_sec, cam_first_call_s=compile_s,
                    jaxflow_forward_s=j_fwd, cam_over_forward=j_sec / j_fwd, torch_cam_s=t_sec,
                    speedup_vs_torch=t_sec / j_sec, maps_max_abs_diff=float(np.abs(jmaps - tmaps).max()),
                    maps_median_corr=float(np.median(corr)) if corr else float("nan"),
                    maps_min_corr=float(np.min(corr)) if corr else float("nan"),
                    torch_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else 0.0,
                    jax_peak_gib=jax_peak_gib())
        except Exception as e:  # noqa: BLE001
            rep.error("cam", e)

    goals = {}
    if impls:
        goals["forward_over_torch_sdpa"] = max(fwd.get(f"{i}_over_torch_sdpa", 0.0) for i in impls)
        goals["forward_over_torch_sdpa_goal_1.5_met"] = goals["forward_over_torch_sdpa"] >= 1.5
        goals["prefill_mfu"] = max(fwd.get(f"{i}_mfu", 0.0) for i in impls)
        goals["prefill_mfu_goal_0.5_met"] = goals["prefill_mfu"] >= 0.5
    gen = rep.data["phases"].get("generate", {})
    proj = [v for k, v in gen.items() if k.endswith("_pope_x33_projected_min")]
    if proj:  # evaluate.py's path: truncation_generate, 8 new tokens per POPE answer
        goals["pope_x33_projected_min"] = min(proj)
        goals["pope_x33_goal_10min_met"] = min(proj) <= 10
    rep.put("goals", **goals)
    print(json.dumps(rep.data, indent=1))


if __name__ == "__main__":
    main()
