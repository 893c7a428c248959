"""Every entry point on a sharded model against the same model on one device, run in a fresh process
(the simulated CPU devices must be set before jax starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_check.py [--meshes 8x1,4x2,2x4,2x4:fsdp]

The model is a tiny LLaVA built from a transformers config with every sharded width divisible by 4
(so heads, MLP and vocabulary really split on the model axis) and a batch of 8 rows (so the rows split
on the data axis). Prints one JSON object: per mesh and entry point, the largest absolute difference
and the scale (largest absolute value) of the single-device result, and how the parameters lie.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_llava_dir(work: str) -> str:
    """A tiny random LLaVA (transformers config, save_pretrained) converted by jaxflow; every sharded
    width (heads x head_dim, key/value heads x head_dim, MLP, vocabulary) divisible by 4."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import jaxflow

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                              image_size=56, patch_size=14, projection_dim=16, initializer_factor=1.0)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=127)
    hf_dir = os.path.join(work, "hf")
    LlavaForConditionalGeneration._from_config(cfg).save_pretrained(hf_dir)
    out = os.path.join(work, "jf")
    jaxflow.convert_checkpoint(hf_dir, out, "float32", progress=False, allow_no_tokenizer=True)
    return out


def batch(model, rows: int = 8, seed: int = 0):
    """rows x (prompt with one image, left padded to different lengths) and an answer mask."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    n_img = cfg.num_image_tokens
    t = n_img + 12
    ids = np.zeros((rows, t), np.int32)
    mask = np.zeros((rows, t), np.int32)
    answer = np.zeros((rows, t), bool)
    for r in range(rows):
        pad = r % 3
        pre = rng.integers(3, cfg.text.vocab_size - 10, size=2)
        post = rng.integers(3, cfg.text.vocab_size - 10, size=t - pad - 2 - n_img)
        ids[r, pad:] = np.concatenate([pre, np.full(n_img, cfg.image_token_id), post])
        mask[r, pad:] = 1
        answer[r, -2:] = True
    size = cfg.vision.image_size
    pixels = rng.standard_normal((rows, 3, size, size)).astype(np.float32)
    return ids, mask, pixels, answer


def entry_points(model, ids, mask, pixels, answer) -> dict[str, np.ndarray]:
    import jaxflow
    from jaxflow.analysis.knockout import standard_paths, token_groups

    L = model.config.text.num_layers
    image = ids == model.config.image_token_id
    query = np.zeros_like(answer)
    query[:, -3] = True
    out = {
        "forward": jaxflow.forward(model, ids, pixels, mask).logits,
        "generate": jaxflow.generate(model, ids, pixels, mask, max_new_tokens=4).tokens,
        "truncation_sweep": jaxflow.truncation_sweep(model, ids, pixels, mask).logits,
        "truncation_generate": jaxflow.truncation_generate(model, ids, pixels, mask, max_new_tokens=3).tokens,
        "cam": jaxflow.llava_cams(model, ids, pixels, answer, attention_mask=mask).raw["paper"],
        "attention_shares": jaxflow.attention_shares(model, ids, pixels, query, attention_mask=mask),
        "saliency": jaxflow.saliency(model, ids, pixels, answer, query, attention_mask=mask)[0],
        "knockout": jaxflow.knockout(model, ids, pixels, mask, np.ones_like(image), image,
                                     np.arange(L) >= L // 2).logits,
        "knockout_sweep": jaxflow.knockout_sweep(model, ids, pixels, mask,
                                                 standard_paths(token_groups(ids, mask, model.config.image_token_id)),
                                                 window=1).probs,
        "logit_lens": jaxflow.logit_lens(model, ids, pixels, mask).logits,
    }
    return {k: np.asarray(getattr(v, "shares", v), np.float64) for k, v in out.items()}


def families_report(shape=(2, 4)) -> dict:
    """The other families (tiny checkpoints of jaxflow.tiny, two prompts on the demo image): forward,
    the truncation sweep and CAM on a mesh against one device."""
    import jaxflow
    from jaxflow import sharding as S
    from jaxflow import tiny
    from jaxflow.pipeline import encode, load_bundle

    image = os.path.join(jaxflow.__path__[0], "assets", "demo.png")
    out = {}
    with tempfile.TemporaryDirectory() as work:
        paths = {"internvl": tiny.save_tiny_internvl_checkpoint(os.path.join(work, "iv")),
                 "qwen2_vl": tiny.save_tiny_qwen2_vl_checkpoint(os.path.join(work, "q2"), "qwen2_vl"),
                 "qwen2_5_vl": tiny.save_tiny_qwen2_vl_checkpoint(os.path.join(work, "q25"), "qwen2_5_vl"),
                 "qwen_vl": tiny.save_tiny_qwen_vl_checkpoint(os.path.join(work, "q1"))}
        for family, path in paths.items():
            one = load_bundle(path)
            b, enc = encode(one, [image, image], ["Is there a red circle?", "What colour is the square?"],
                            with_images=True)
            answer = np.zeros(b.input_ids.shape, bool)
            answer[:, -1] = True

            def run(m):
                args = (b.input_ids, enc.pixel_values, b.attention_mask)
                return {"forward": jaxflow.forward(m, *args, **enc.image_kw).logits,
                        "truncation_sweep": jaxflow.truncation_sweep(m, *args, **enc.image_kw).logits,
                        "cam": jaxflow.llava_cams(m, b.input_ids, enc.pixel_values, answer,
                                                  attention_mask=b.attention_mask, **enc.image_kw).raw["gradxact"]}

            want = {k: np.asarray(v, np.float64) for k, v in run(one.model).items()}
            model = jaxflow.load(path, mesh=S.make_mesh(shape, jax_devices()[:shape[0] * shape[1]]))
            got = {k: np.asarray(v, np.float64) for k, v in run(model).items()}
            out[family] = {"params": S.sharding_summary(model),
                           "diff": {n: float(np.abs(got[n] - want[n]).max()) for n in want},
                           "scale": {n: float(np.abs(want[n]).max()) for n in want}}
    return out


def jax_devices():
    import jax

    return jax.devices()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meshes", default="8x1,4x2,2x4,2x4:fsdp", help="data x model[:rules], comma separated")
    ap.add_argument("--checkpoint", default=None, help="a jaxflow checkpoint (default: build the tiny LLaVA)")
    ap.add_argument("--families", action="store_true", help="instead: the other families on a 2x4 mesh")
    args = ap.parse_args(argv)
    if args.families:
        print(json.dumps(families_report()))
        return 0
    import jax

    import jaxflow
    from jaxflow import sharding as S

    with tempfile.TemporaryDirectory() as work:
        path = args.checkpoint or tiny_llava_dir(work)
        single = jaxflow.load(path)
        ids, mask, pixels, answer = batch(single)
        want = entry_points(single, ids, mask, pixels, answer)
        report = {"devices": jax.device_count(), "meshes": {}}
        for m in args.meshes.split(","):
            shape, _, rules = m.partition(":")
            d, k = (int(x) for x in shape.split("x"))
            mesh = S.make_mesh((d, k), jax.devices()[:d * k])
            model = jaxflow.load(path, mesh=mesh, rules=rules or "tp")
            got = entry_points(model, ids, mask, pixels, answer)
            report["meshes"][m] = {
                "params": S.sharding_summary(model),
                "logits_sharding": str(jaxflow.forward(model, ids, pixels, mask).logits.sharding.spec),
                "diff": {n: float(np.abs(got[n] - want[n]).max()) for n in want},
                "scale": {n: float(np.abs(want[n]).max()) for n in want},
            }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
