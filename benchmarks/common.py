"""Shared pieces of jaxflow's benchmarks: the bench model configs, model builders, inputs, timing, memory.

A "bench config" is a real model family's structure scaled down in width so that it runs on a 2-core
CPU while keeping what matters for speed: the decoder depth, the image-token count per image and
the real vocabulary. Every benchmark takes `--family` (and `--tiles` for InternVL, see
`add_config_args`); the default, "llava", is the original bench config:

  llava     LLaVA-1.5 structure (LlavaForConditionalGeneration), 576 image tokens per image
            decoder  Llama, 32 layers, hidden 256, 8 heads (head_dim 32), 8 kv heads, MLP 688, vocab 32064
            vision   CLIP, 336 px, patch 14 (24x24 grid, feature layer -2, strategy "default"), hidden
                     256, 4 layers, 8 heads, MLP 1024
            row      [BOS, 7 system tokens, 576 image tokens, text]; pixel_values (B, 3, 336, 336)
  internvl  InternVL3 structure (InternVLForConditionalGeneration, the -hf checkpoints), 256 image tokens per tile
            decoder  Qwen2 (q/k/v biases), 28 layers, hidden 256, 4 heads of 64, 2 kv heads, MLP 1024,
                     vocab 151674 (InternVL3's), tied embeddings, rope theta 1e6
            vision   InternViT, 448 px tiles, patch 14 (32x32 grid + CLS), hidden 128, 4 layers, 4 heads,
                     MLP 512, layer_norm, attention biases, layer scale; pixel shuffle 0.5 -> 16x16 =
                     256 tokens per tile; LayerNorm + 2-layer GELU projector
            row      [7 system tokens, <img>, 256 * tiles image tokens, </img>, text]; one image per row
                     of `tiles` tiles (1, or 3 = 1x2 tiles + the thumbnail); pixel_values (B * tiles,
                     3, 448, 448)
  qwen2_vl  Qwen2-VL structure (Qwen2VLForConditionalGeneration), images of two sizes, 576 and 324 tokens
            decoder  Qwen2 (q/k/v biases), 28 layers, hidden 256, 4 heads of 64, 2 kv heads, MLP 1024,
                     vocab 151936 (Qwen2-VL's), untied embeddings, M-RoPE (theta 1e6, sections [8, 12, 12])
            vision   Qwen2-VL ViT, patch 14, temporal patch 2, embed 128, 4 layers, 4 heads, MLP ratio 4;
                     2x2 patch merger to 256 (= the decoder width); packed patches, attention per image
            row      [left padding, 7 system tokens, <|vision_start|>, image tokens, <|vision_end|>, text];
                     one image per row, rows alternating image_grid_thw (1, 48, 48) -> 576 tokens (672 px)
                     and (1, 36, 36) -> 324 tokens (504 px), the 324-token rows left-padded to the longest;
                     pixel_values (total patches, 3*2*14*14) and image_grid_thw (B, 3) int64
  qwen_vl   Qwen-VL (v1, 2023) structure; transformers has no class for it, so the torch side is the
            OFFICIAL remote code (QWenLMHeadModel, eager attention, its only path) run offline through
            ../shared/refs/qwen_vl_v1/reference.py ($JAXFLOW_QWEN_VL_REFS), 256 image tokens per image
            decoder  Qwen-7B style (c_attn with bias, w2 gate), 32 layers (the real depth), hidden 256 =
                     4 heads x kv_channels 64, MLP 688 (intermediate_size 1376, Qwen-7B's ratio), vocab
                     151936 (Qwen-VL's), untied; dynamic NTK + logn attention on, seq_length 2048 (the
                     real value: the bench prompt, T = 320, runs in the plain regime, alpha 1, no logn)
            vision   ViT 448 px, patch 14 (32x32 patches: the 16x16 positional table is bicubically
                     enlarged, as in the real model), width 128, 4 layers, 4 heads, mlp_ratio 4.9231;
                     resampler of the real 256 queries, output_dim 256 (= hidden, 2 heads of 128)
            row      [7 system tokens, <img>, 256 <imgpad>, </img>, text] (the real tokenizer's ids
                     151857/151858/151859); one image per row, pixel_values (B, 3, 448, 448)
            weights  written by reference.make_model (the official layout, its seeded init); the same
                     files go through jaxflow's real converter. Without the refs folder the torch side is
                     skipped with a message and jaxflow runs on its own random init.

`bench_config(family, tiles)` returns a `BenchConfig` with everything a benchmark needs (the
transformers config, the torch class, the inputs, the header line). `BenchConfig.inputs_kw` gives the
inputs of any family as (input_ids, attention_mask, pixel_values, image_kw), image_kw being the
family's image arguments for jaxflow's entry points ({} for LLaVA and InternVL, {"image_grid_thw": ...}
for Qwen2-VL); `BenchConfig.torch_inputs` turns them into transformers' forward kwargs; `inputs`
(LLaVA, InternVL and Qwen-VL) is the older 3-tuple. Weights are random (no download
ever). `build_torch_model` makes the transformers model, `build_jaxflow_model` pushes the same weights
through the real converter (save_pretrained -> jaxflow.convert_checkpoint -> jaxflow.load), so both
frameworks hold identical parameters; `random_jaxflow_model` is a jaxflow-initialised model of the
same structure (for benchmarks that compare jaxflow with itself). Qwen-VL's torch side is the
official code instead: `make_official_model` (reference.make_model), `load_official_model`,
`official_logits`, `official_sweep_cases`, `official_cam_cases`; `torch_side_missing(cfg)` says why
it cannot run (no refs folder), in which case the benchmarks skip it with that message.

Goals every benchmark prints next to its figures (`GOALS`): jaxflow's forward faster than torch sdpa,
the (L+1)-variant truncation sweep <= 3x one forward, the all-layer CAM <= 3.5x one forward.

Peak memory of one framework is only meaningful in a process that holds nothing else:
`run_isolated(fn, *args)` runs `fn` in a fresh 'spawn' subprocess and returns its result together
with that child's own peak RSS, so several frameworks can be measured side by side in one run.
Nothing here imports jax or torch at module level, so thread settings (`set_threads`) can be applied
before either initialises.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import resource
import statistics
import time

import numpy as np

TORCH_SEED = 0

# ----- the LLaVA bench config (module-level names kept: bench_eval and older callers use them)
IMAGE_TOKEN_ID = 32000
VOCAB_SIZE = 32064
IMAGE_SIZE = 336
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576 ("default" strategy drops CLS)
SYSTEM_PREFIX_LEN = 8  # BOS + a few "system" tokens before the image block

TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=32,
            num_attention_heads=8, num_key_value_heads=8, head_dim=32, max_position_embeddings=4096,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
VISION = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=256, num_hidden_layers=4,
              num_attention_heads=8, intermediate_size=1024, projection_dim=256, hidden_act="quick_gelu")
TOP = dict(image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
           projector_hidden_act="gelu", tie_word_embeddings=False)

# ----- the InternVL bench config (InternVL3 ids: <img> 151665, </img> 151666, <IMG_CONTEXT> 151667)
INTERNVL_VOCAB_SIZE = 151674
INTERNVL_IMAGE_TOKEN_ID = 151667
INTERNVL_IMG_START, INTERNVL_IMG_END = 151665, 151666
INTERNVL_TEXT_ID_MAX = 151643  # ids below this are ordinary text tokens (151643 = <|endoftext|>)
INTERNVL_TILE = 448
INTERNVL_TOKENS_PER_TILE = int((INTERNVL_TILE // PATCH_SIZE) * 0.5) ** 2  # 32x32 grid, shuffled by 0.5: 256
INTERNVL_TEXT = dict(vocab_size=INTERNVL_VOCAB_SIZE, hidden_size=256, intermediate_size=1024, num_hidden_layers=28,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=151643,
                     eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=True)
INTERNVL_VISION = dict(image_size=INTERNVL_TILE, patch_size=PATCH_SIZE, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=512, hidden_act="gelu", norm_type="layer_norm",
                       use_qk_norm=False, attention_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1)
INTERNVL_TOP = dict(image_token_id=INTERNVL_IMAGE_TOKEN_ID, image_seq_length=INTERNVL_TOKENS_PER_TILE,
                    downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                    vision_feature_select_strategy="default", tie_word_embeddings=True)

# ----- the Qwen2-VL bench config (Qwen2-VL ids: <|vision_start|> 151652, <|vision_end|> 151653, <|image_pad|> 151655)
QWEN2VL_VOCAB_SIZE = 151936
QWEN2VL_IMAGE_TOKEN_ID = 151655
QWEN2VL_VIDEO_TOKEN_ID = 151656
QWEN2VL_VISION_START, QWEN2VL_VISION_END = 151652, 151653
QWEN2VL_TEXT_ID_MAX = 151643  # ids below this are ordinary text tokens (151643 = <|endoftext|>, the pad)
QWEN2VL_MERGE = 2
QWEN2VL_GRIDS = ((1, 48, 48), (1, 36, 36))  # (t, h, w) patches of rows 0, 2, ... and 1, 3, ...: 576 and 324 tokens
QWEN2VL_TEXT = dict(vocab_size=QWEN2VL_VOCAB_SIZE, hidden_size=256, intermediate_size=1024, num_hidden_layers=28,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
                    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=False)
QWEN2VL_VISION = dict(depth=4, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=4, in_channels=3,
                      patch_size=PATCH_SIZE, spatial_merge_size=QWEN2VL_MERGE, temporal_patch_size=2,
                      hidden_act="quick_gelu")
QWEN2VL_TOP = dict(image_token_id=QWEN2VL_IMAGE_TOKEN_ID, video_token_id=QWEN2VL_VIDEO_TOKEN_ID,
                   vision_start_token_id=QWEN2VL_VISION_START, vision_end_token_id=QWEN2VL_VISION_END,
                   tie_word_embeddings=False)


# ----- the Qwen-VL (v1) bench config: the official config.json keys (reference.make_model overrides); the real
# tokenizer's ids (<img> 151857, </img> 151858, <imgpad> 151859, <|endoftext|> 151643)
QWENVL_VOCAB_SIZE = 151936
QWENVL_IMG_START, QWENVL_IMG_END = 151857, 151858
QWENVL_IMAGE_TOKEN_ID = 151859  # <imgpad>: the 256 slots of an image span get the image's features
QWENVL_TEXT_ID_MAX = 151643  # ids below this are ordinary text tokens (151643 = <|endoftext|>)
QWENVL_IMAGE_SIZE = 448  # 32 x 32 patches, as the real model: the 16 x 16 positional tables are enlarged (bicubic)
QWENVL_QUERIES = 256  # the real resampler's query count = image tokens per image
QWENVL_TEXT = dict(vocab_size=QWENVL_VOCAB_SIZE, hidden_size=256, num_attention_heads=4, kv_channels=64,
                   intermediate_size=1376, num_hidden_layers=32, seq_length=2048, max_position_embeddings=8192,
                   layer_norm_epsilon=1e-6, rotary_emb_base=10000, rotary_pct=1.0, no_bias=True,
                   use_dynamic_ntk=True, use_logn_attn=True, tie_word_embeddings=False)
QWENVL_VISION = dict(width=128, layers=4, heads=4, mlp_ratio=4.9231, image_size=QWENVL_IMAGE_SIZE,
                     patch_size=PATCH_SIZE, n_queries=QWENVL_QUERIES, output_dim=256, image_start_id=QWENVL_IMG_START)
QWENVL_REFS_ENV = "JAXFLOW_QWEN_VL_REFS"
QWENVL_REFS_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                                   "refs", "qwen_vl_v1")


def qwen2vl_grid_tokens(grid) -> int:
    """Image tokens of one (t, h, w) patch grid: t * h * w / merge^2."""
    t, h, w = grid
    return t * h * w // (QWEN2VL_MERGE * QWEN2VL_MERGE)


FAMILIES = ("llava", "internvl", "qwen2_vl", "qwen_vl")
INTERNVL_TILES = (1, 3)  # one tile, or 1x2 tiles + the thumbnail

# the goals every benchmark prints next to its figures
GOALS = {"jaxflow_forward_over_torch_sdpa_speed_min": 1.0,  # tokens/s ratio: faster than torch sdpa
         "sweep_over_forward_max": 3.0,  # the (L+1)-variant truncation sweep / one jaxflow forward
         "cam_over_forward_max": 3.5}  # all-layer LLaVA-CAM / one jaxflow forward


# --------------------------------------------------------------------------- config and models


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One bench config: the model structure (by family) and the image layout of the inputs (tiles)."""

    family: str  # "llava" | "internvl" | "qwen2_vl" | "qwen_vl"
    tiles: int  # pixel rows per image: 1 for LLaVA, Qwen2-VL and Qwen-VL; InternVL 1, or 3 (1x2 tiles + thumbnail)
    image_token_id: int
    vocab_size: int
    num_layers: int  # decoder layers L (the sweep has L + 1 variants)
    image_size: int  # px of one image (LLaVA), one tile (InternVL), the largest image's side (Qwen2-VL)
    tokens_per_image: int  # image tokens in a row (one image per row; Qwen2-VL: the largest image's)
    prefix_len: int  # tokens before the image block (the system prompt; InternVL/Qwen2-VL/Qwen-VL: ending with <img>)
    text: dict  # Qwen-VL: the official config.json's top-level keys
    vision: dict  # Qwen-VL: its `visual` section
    top: dict
    image_grids: tuple = ()  # Qwen2-VL: the (t, h, w) patch grids that rows cycle through

    @property
    def name(self) -> str:
        if self.family != "internvl":
            return self.family
        return f"internvl-{self.tiles}tile{'s' if self.tiles > 1 else ''}"

    @property
    def torch_class_name(self) -> str:
        return {"llava": "LlavaForConditionalGeneration", "internvl": "InternVLForConditionalGeneration",
                "qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen_vl": "QWenLMHeadModel (official remote code)"}[self.family]

    @property
    def official(self) -> bool:
        """True when the torch side is the official remote code (Qwen-VL), not a transformers class."""
        return self.family == "qwen_vl"

    @property
    def torch_attn_impls(self) -> tuple:
        """The torch attention paths there are: transformers' eager and sdpa; the official Qwen-VL code
        has eager attention only (its flash path is dead code)."""
        return ("eager",) if self.official else ("eager", "sdpa")

    @property
    def torch_baseline(self) -> str:
        """The torch row the forward goal compares with: torch-sdpa, or torch-eager (the official code) for Qwen-VL."""
        return f"torch-{self.torch_attn_impls[-1]}"

    def torch_class(self):
        import transformers

        if self.official:
            raise ValueError("qwen_vl has no transformers class: the torch side is the official remote code "
                             "(make_official_model / load_official_model)")
        return getattr(transformers, self.torch_class_name)

    def seq_len(self, text_tokens: int) -> int:
        return self.tokens_per_image + text_tokens

    def describe(self) -> str:
        """One line for benchmark headers."""
        t, v = self.text, self.vision
        if self.family == "llava":
            return (f"LLaVA-1.5 structure: Llama {t['num_hidden_layers']} layers x {t['hidden_size']} wide, vocab "
                    f"{self.vocab_size}; CLIP {v['num_hidden_layers']} layers x {v['hidden_size']}, "
                    f"{self.image_size} px -> {self.tokens_per_image} image tokens per image")
        if self.family == "qwen2_vl":
            sizes = " and ".join(f"{h}x{w} patches ({h * PATCH_SIZE} px, {qwen2vl_grid_tokens((tt, h, w))} tokens)"
                                 for tt, h, w in self.image_grids)
            return (f"Qwen2-VL structure: Qwen2 {t['num_hidden_layers']} layers x {t['hidden_size']} wide "
                    f"({t['num_attention_heads']} heads of {t['hidden_size'] // t['num_attention_heads']}, "
                    f"{t['num_key_value_heads']} kv heads, MLP {t['intermediate_size']}, M-RoPE sections "
                    f"{t['rope_parameters']['mrope_section']}), vocab {self.vocab_size}; ViT {v['depth']} layers x "
                    f"{v['embed_dim']} ({v['num_heads']} heads), patch {v['patch_size']}, 2x2 merge -> "
                    f"{v['hidden_size']}; one image per row, rows alternating {sizes}, left-padded")
        if self.family == "qwen_vl":
            g = v["image_size"] // v["patch_size"]
            return (f"Qwen-VL (v1) structure, torch side the official remote code: Qwen decoder "
                    f"{t['num_hidden_layers']} layers x {t['hidden_size']} wide ({t['num_attention_heads']} heads of "
                    f"{t['kv_channels']}, MLP {t['intermediate_size'] // 2}, dynamic NTK + logn, seq_length "
                    f"{t['seq_length']}), vocab {self.vocab_size}; ViT {v['layers']} layers x {v['width']} "
                    f"({v['heads']} heads), {v['image_size']} px -> {g}x{g} patches (16x16 positional table "
                    f"bicubically enlarged), resampler {v['n_queries']} queries ({v['output_dim'] // 128} heads) -> "
                    f"{self.tokens_per_image} image tokens per image")
        layout = "1 tile" if self.tiles == 1 else f"{self.tiles} tiles (1x{self.tiles - 1} + thumbnail)"
        return (f"InternVL structure: Qwen2 {t['num_hidden_layers']} layers x {t['hidden_size']} wide "
                f"({t['num_attention_heads']} heads of {t['hidden_size'] // t['num_attention_heads']}, "
                f"{t['num_key_value_heads']} kv heads, MLP {t['intermediate_size']}), vocab {self.vocab_size}; "
                f"InternViT {v['num_hidden_layers']} layers x {v['hidden_size']}, {self.image_size} px tiles -> "
                f"{INTERNVL_TOKENS_PER_TILE} tokens per tile; one image of {layout} = {self.tokens_per_image} "
                "image tokens per row")

    def report(self) -> dict:
        """The config as plain data for the JSON results."""
        out = {"name": self.name, "family": self.family, "tiles": self.tiles,
               "tokens_per_image": self.tokens_per_image, "prefix_len": self.prefix_len,
               "text": self.text, "vision": self.vision, "top": self.top}
        if self.image_grids:
            out["image_grids"] = [list(g) for g in self.image_grids]
        return out

    def hf_config(self, **overrides):
        """The transformers config. Overrides: `text=dict(...)`, `vision=dict(...)`, or any top-level
        field (e.g. `cfg.hf_config(text=dict(num_hidden_layers=4))`)."""
        if self.official:
            raise ValueError("qwen_vl has no transformers config: use BenchConfig.config_dict() (the official "
                             "config.json)")
        text = {**self.text, **overrides.pop("text", {})}
        vision = {**self.vision, **overrides.pop("vision", {})}
        top = {**self.top, **overrides}
        if self.family == "llava":
            from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

            return LlavaConfig(vision_config=CLIPVisionConfig(**vision).to_dict(),
                               text_config=LlamaConfig(**text).to_dict(), **top)
        if self.family == "qwen2_vl":
            from transformers import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

            return Qwen2VLConfig(vision_config=Qwen2VLVisionConfig(**vision).to_dict(),
                                 text_config=Qwen2VLTextConfig(**text).to_dict(), **top)
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        return InternVLConfig(vision_config=InternVLVisionConfig(**vision).to_dict(),
                              text_config=Qwen2Config(**text).to_dict(), **top)

    def config_dict(self) -> dict:
        """The checkpoint's config.json as a dict: the transformers config's `to_dict()`, or for Qwen-VL the
        official config (model_type "qwen", the `visual` section), what `reference.make_model` writes."""
        if not self.official:
            return self.hf_config().to_dict()
        return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", **self.text, "visual": dict(self.vision)}

    def official_overrides(self) -> dict:
        """Qwen-VL: the keyword arguments of `reference.make_model` that give this structure."""
        if not self.official:
            raise ValueError(f"{self.family} is built with transformers, not the official Qwen-VL code")
        return {**self.text, "visual": dict(self.vision)}

    def inputs_kw(self, batch: int = 4, text_tokens: int = 64, seed: int = 0):
        """Any family: numpy (input_ids (B, T) int64, attention_mask (B, T) int64, pixel_values float32,
        image_kw), T = tokens_per_image + text_tokens; image_kw is what jaxflow's entry points take besides
        the pixels ({} for LLaVA and InternVL: then the first three are exactly `inputs(...)`).
        Qwen2-VL: row b holds one image of grid image_grids[b % 2] ((1, 48, 48): 576 tokens, then
        (1, 36, 36): 324 tokens) as [left padding (mask 0, id <|endoftext|>), 7 system tokens,
        <|vision_start|>, image tokens, <|vision_end|>, text_tokens - 9 text tokens]; pixel_values
        (total patches, 3 * 2 * 14 * 14) random normal, patches of row 0's image first;
        image_kw = {"image_grid_thw": (B, 3) int64}."""
        if self.family != "qwen2_vl":
            return (*self.inputs(batch, text_tokens, seed), {})
        if text_tokens < self.prefix_len + 2:
            raise ValueError(f"text_tokens must be >= {self.prefix_len + 2} (the {self.prefix_len}-token "
                             "system prefix, <|vision_end|> and text after the image)")
        rng = np.random.RandomState(seed)
        t = self.seq_len(text_tokens)
        ids = rng.randint(3, QWEN2VL_TEXT_ID_MAX, size=(batch, t)).astype(np.int64)
        mask = np.ones((batch, t), np.int64)
        grids = np.array([self.image_grids[b % len(self.image_grids)] for b in range(batch)], np.int64)
        for b, grid in enumerate(grids):
            pad = self.tokens_per_image - qwen2vl_grid_tokens(grid)
            ids[b, :pad], mask[b, :pad] = self.text["pad_token_id"], 0
            start = pad + self.prefix_len  # first image token
            ids[b, start - 1] = QWEN2VL_VISION_START
            ids[b, start:start + qwen2vl_grid_tokens(grid)] = self.image_token_id
            ids[b, start + qwen2vl_grid_tokens(grid)] = QWEN2VL_VISION_END
        v = self.vision
        patch_dim = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
        pixels = rng.randn(int(grids.prod(-1).sum()), patch_dim).astype(np.float32)
        return ids, mask, pixels, {"image_grid_thw": grids}

    def torch_inputs(self, ids, mask, pixels, image_kw) -> dict:
        """The transformers forward's input kwargs (torch tensors) for `inputs_kw`'s arrays: input_ids,
        attention_mask, pixel_values; Qwen2-VL also image_grid_thw and mm_token_type_ids (1 at image tokens)."""
        import torch

        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
               "pixel_values": torch.from_numpy(pixels)}
        if self.family == "qwen2_vl":
            out["image_grid_thw"] = torch.from_numpy(np.asarray(image_kw["image_grid_thw"], np.int64))
            out["mm_token_type_ids"] = torch.from_numpy((ids == self.image_token_id).astype(np.int64))
        return out

    def inputs(self, batch: int = 4, text_tokens: int = 64, seed: int = 0):
        """LLaVA, InternVL and Qwen-VL (Qwen2-VL needs image_grid_thw too: `inputs_kw`):
        numpy (input_ids (B, T) int64, attention_mask (B, T) int64 all ones, pixel_values float32),
        T = tokens_per_image + text_tokens, one image per row after `prefix_len` tokens.
        LLaVA: [BOS, 7 system tokens, 576 image tokens, text]; pixel_values (B, 3, 336, 336).
        InternVL: [7 system tokens, <img>, 256 * tiles image tokens, </img>, text]; pixel_values
        (B * tiles, 3, 448, 448), row b's tiles at [b * tiles, (b + 1) * tiles).
        Qwen-VL: [7 system tokens, <img>, 256 <imgpad>, </img>, text] with the real tokenizer's ids (the
        official layout: every slot between the markers is <imgpad>); pixel_values (B, 3, 448, 448).
        Text ids avoid the image token and the special ids; text_tokens must exceed prefix_len (+1 for
        InternVL's and Qwen-VL's </img>)."""
        if self.family == "qwen2_vl":
            raise ValueError("qwen2_vl inputs carry image_grid_thw: use BenchConfig.inputs_kw")
        after_min = 1 if self.family == "llava" else 2  # a text token after the image (and </img>)
        if text_tokens < self.prefix_len + after_min:
            raise ValueError(f"text_tokens must be >= {self.prefix_len + after_min} (the {self.prefix_len}-token "
                             "system prefix and text after the image)")
        rng = np.random.RandomState(seed)
        t = self.seq_len(text_tokens)
        img = slice(self.prefix_len, self.prefix_len + self.tokens_per_image)
        if self.family == "llava":
            ids = rng.randint(3, IMAGE_TOKEN_ID, size=(batch, t)).astype(np.int64)
            ids[:, 0] = self.text["bos_token_id"]
        else:
            start, end, id_max = ((QWENVL_IMG_START, QWENVL_IMG_END, QWENVL_TEXT_ID_MAX) if self.family == "qwen_vl"
                                  else (INTERNVL_IMG_START, INTERNVL_IMG_END, INTERNVL_TEXT_ID_MAX))
            ids = rng.randint(3, id_max, size=(batch, t)).astype(np.int64)
            ids[:, img.start - 1] = start
            ids[:, img.stop] = end
        ids[:, img] = self.image_token_id
        mask = np.ones((batch, t), np.int64)
        pixels = rng.randn(batch * self.tiles, 3, self.image_size, self.image_size).astype(np.float32)
        return ids, mask, pixels


def bench_config(family: str = "llava", tiles: int = 1) -> BenchConfig:
    """The bench config of `family` ("llava", "internvl", "qwen2_vl" or "qwen_vl"); tiles: InternVL tiles per
    image (1 or 3)."""
    if family == "llava":
        if tiles != 1:
            raise ValueError("LLaVA takes one 336 px image per row (tiles must be 1)")
        return BenchConfig("llava", 1, IMAGE_TOKEN_ID, VOCAB_SIZE, TEXT["num_hidden_layers"], IMAGE_SIZE,
                           NUM_IMAGE_TOKENS, SYSTEM_PREFIX_LEN, TEXT, VISION, TOP)
    if family == "internvl":
        if tiles not in INTERNVL_TILES:
            raise ValueError(f"InternVL bench images have {' or '.join(map(str, INTERNVL_TILES))} tiles, got {tiles}")
        return BenchConfig("internvl", tiles, INTERNVL_IMAGE_TOKEN_ID, INTERNVL_VOCAB_SIZE,
                           INTERNVL_TEXT["num_hidden_layers"], INTERNVL_TILE, INTERNVL_TOKENS_PER_TILE * tiles,
                           SYSTEM_PREFIX_LEN, INTERNVL_TEXT, INTERNVL_VISION, INTERNVL_TOP)
    if family == "qwen2_vl":
        if tiles != 1:
            raise ValueError("the Qwen2-VL bench config takes one image per row (tiles must be 1)")
        return BenchConfig("qwen2_vl", 1, QWEN2VL_IMAGE_TOKEN_ID, QWEN2VL_VOCAB_SIZE, QWEN2VL_TEXT["num_hidden_layers"],
                           max(g[1] for g in QWEN2VL_GRIDS) * PATCH_SIZE,
                           max(qwen2vl_grid_tokens(g) for g in QWEN2VL_GRIDS), SYSTEM_PREFIX_LEN, QWEN2VL_TEXT,
                           QWEN2VL_VISION, QWEN2VL_TOP, QWEN2VL_GRIDS)
    if family == "qwen_vl":
        if tiles != 1:
            raise ValueError("the Qwen-VL bench config takes one 448 px image per row (tiles must be 1)")
        return BenchConfig("qwen_vl", 1, QWENVL_IMAGE_TOKEN_ID, QWENVL_VOCAB_SIZE, QWENVL_TEXT["num_hidden_layers"],
                           QWENVL_IMAGE_SIZE, QWENVL_QUERIES, SYSTEM_PREFIX_LEN, QWENVL_TEXT, QWENVL_VISION, {})
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def add_config_args(ap):
    """--family / --tiles on an argparse parser (read back with `config_from_args`)."""
    ap.add_argument("--family", choices=FAMILIES, default="llava",
                    help="bench config: llava (default; LLaVA-1.5 structure), internvl (InternVL3 structure: "
                    "InternViT on 448 px tiles, 256 tokens per tile, Qwen2 28 layers) or qwen2_vl (Qwen2-VL "
                    "structure: images of 576 and 324 tokens in alternate rows, M-RoPE, Qwen2 28 layers) or qwen_vl "
                    "(Qwen-VL v1 structure: 448 px ViT, 256-query resampler, Qwen 32 layers with dynamic NTK and "
                    "logn; torch side = the official remote code from $JAXFLOW_QWEN_VL_REFS); see "
                    "benchmarks/common.py")
    ap.add_argument("--tiles", type=int, choices=INTERNVL_TILES, default=1,
                    help="internvl: tiles per image, 1 or 3 (1x2 tiles + thumbnail)")
    return ap


def config_from_args(args) -> BenchConfig:
    return bench_config(args.family, args.tiles if args.family == "internvl" else 1)


def _as_config(config) -> BenchConfig:
    if config is None:
        return bench_config("llava")
    return bench_config(config) if isinstance(config, str) else config


def bench_hf_config(config: BenchConfig | str | None = None, **overrides):
    """The bench transformers config (default: LLaVA's `LlavaConfig`); see `BenchConfig.hf_config`."""
    return _as_config(config).hf_config(**overrides)


def build_torch_model(attn_implementation: str = "sdpa", seed: int = TORCH_SEED,
                      config: BenchConfig | str | None = None, **config_overrides):
    """The transformers model of the bench config (default LLaVA) with random weights (fixed torch
    seed), eval mode, fp32."""
    import torch

    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
    cfg = _as_config(config)
    if cfg.official:
        raise ValueError("qwen_vl: the torch side is the official remote code, built by make_official_model")
    torch.manual_seed(seed)
    model = cfg.torch_class()._from_config(cfg.hf_config(**config_overrides), attn_implementation=attn_implementation,
                                           dtype=torch.float32)
    return model.eval()


def save_torch_model(torch_model, hf_dir: str) -> str:
    """save_pretrained (safetensors) into hf_dir; returns hf_dir."""
    torch_model.save_pretrained(hf_dir)
    return hf_dir


def convert_to_jaxflow(hf_dir: str, ckpt_dir: str, dtype: str = "float32") -> str:
    """The real converter (what scripts/convert_checkpoint.py runs), overwriting ckpt_dir."""
    import jaxflow

    return jaxflow.convert_checkpoint(hf_dir, ckpt_dir, dtype, overwrite=True, progress=False, allow_no_tokenizer=True)


def build_jaxflow_model(torch_model, workdir: str, dtype: str = "float32"):
    """Same weights in jaxflow: save_pretrained into workdir/hf, convert to workdir/jaxflow, load."""
    import jaxflow

    hf_dir = save_torch_model(torch_model, os.path.join(workdir, "hf"))
    ckpt = convert_to_jaxflow(hf_dir, os.path.join(workdir, "jaxflow"), dtype)
    return jaxflow.load(ckpt)


def load_torch_model(hf_dir: str, attn_implementation: str):
    """The saved bench model (any family: the class comes from its config.json) back in torch (fp32,
    eval) with the given attention implementation."""
    import json

    import torch
    import transformers

    with open(os.path.join(hf_dir, "config.json")) as f:
        family = json.load(f)["model_type"]
    if family == "qwen":  # the official Qwen-VL layout: its own remote code, eager attention only
        if attn_implementation != "eager":
            raise ValueError(f"the official Qwen-VL code has eager attention only, not {attn_implementation!r}")
        return load_official_model(hf_dir)
    cls = getattr(transformers, bench_config(family, 1).torch_class_name)
    model = cls.from_pretrained(hf_dir, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def random_jaxflow_model(config: BenchConfig | str | None = None, seed: int = 0):
    """A jaxflow model of the bench config with jaxflow's own random init (no torch, no converter).
    LLaVA is built as `Llava(from_hf_dict(...))`, which every jaxflow version has (bench_refactor runs
    it against the pre-refactor tree); other families through the family registry."""
    from flax import nnx

    cfg = _as_config(config)
    d = cfg.config_dict()
    if cfg.family == "llava":
        from jaxflow.models.config import from_hf_dict
        from jaxflow.models.llava import Llava

        return Llava(from_hf_dict(d), rngs=nnx.Rngs(seed))
    from jaxflow.models.family import build_model, config_from_hf_dict

    return build_model(config_from_hf_dict(d), rngs=nnx.Rngs(seed))


# --------------------------------------------------------------------------- Qwen-VL's torch side: the official code


def qwen_vl_refs_dir() -> str:
    """The offline Qwen-VL v1 reference folder: $JAXFLOW_QWEN_VL_REFS, default <repo>/../shared/refs/qwen_vl_v1."""
    return os.path.abspath(os.environ.get(QWENVL_REFS_ENV) or QWENVL_REFS_DEFAULT)


def torch_side_missing(config: BenchConfig | str | None = None) -> str | None:
    """None when the config's torch side can run, else one line saying why not. Only Qwen-VL can lack it:
    its torch side is the official remote code in the refs folder (reference.py + remote/), which needs
    torch, transformers, safetensors and einops. Imports nothing (safe before `set_threads`)."""
    import importlib.util

    cfg = _as_config(config)
    if not cfg.official:
        return None
    d = qwen_vl_refs_dir()
    if not os.path.isfile(os.path.join(d, "reference.py")):
        return (f"skipping the qwen_vl torch side (the official Qwen-VL code): no reference.py in {d} "
                f"(set {QWENVL_REFS_ENV} to the qwen_vl_v1 reference folder)")
    missing = [m for m in ("torch", "transformers", "safetensors", "einops") if importlib.util.find_spec(m) is None]
    if missing:
        return f"skipping the qwen_vl torch side (the official Qwen-VL code): {', '.join(missing)} not installed"
    return None


_QREF = []


def qwen_vl_reference():
    """The refs folder's reference.py, imported once per process without writing bytecode into the shared
    folder (as tests/golden/qwen_vl/make_golden.py does). RuntimeError (the `torch_side_missing` line)
    when it cannot be used."""
    if _QREF:
        return _QREF[0]
    why = torch_side_missing("qwen_vl")
    if why:
        raise RuntimeError(why)
    import sys

    refs = qwen_vl_refs_dir()
    dont = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    sys.path.insert(0, refs)
    try:
        import reference as qref
    finally:
        sys.path.remove(refs)
        sys.dont_write_bytecode = dont
    if os.path.dirname(os.path.abspath(qref.__file__)) != refs:
        raise RuntimeError(f"imported {qref.__file__}, expected the reference.py in {refs}")
    _QREF.append(qref)
    return qref


def make_official_model(out_dir: str, config: BenchConfig | str | None = "qwen_vl", seed: int = 0) -> str:
    """Qwen-VL: `reference.make_model` writes the bench structure with random weights (its own seeded
    init) in the official layout (config.json, the remote code, tokenizer and licence files,
    model.safetensors with the `transformer.*` keys); returns out_dir. These files are what both the
    official torch model and jaxflow's converter read."""
    overrides = _as_config(config).official_overrides()
    return qwen_vl_reference().make_model(out_dir, seed=seed, **overrides)


def official_num_params(model_dir: str) -> int:
    """Parameter count of an official-layout directory, read from the safetensors headers."""
    from safetensors import safe_open

    n = 0
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, f), "np") as sf:
                for k in sf.keys():
                    n += int(np.prod(sf.get_slice(k).get_shape()))
    return n


def load_official_model(model_dir: str):
    """The official QWenLMHeadModel (eval, fp32, eager attention: the only path the code has) of a
    directory, through `reference.load_model` (its shims; every tensor checked against the files).
    transformers' logging is set to errors only (the remote code trips v5 deprecation notices)."""
    qref = qwen_vl_reference()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return qref.load_model(model_dir)


def official_logits(model, ids, pixels, mask):
    """One official forward, no cache: `reference.logits` (input validation, the pixel feed, numpy out):
    (B, T, V) float32."""
    return qwen_vl_reference().logits(model, ids, pixels, mask)


def _official_image_token(model) -> int:
    return int(model.config.visual["image_start_id"]) + 2  # <imgpad>


class official_fixed_features:
    """Context manager: the official forward takes these (n_images, 256, D) features instead of running
    the vision tower (the same hook as reference.py's pixel feed, `visual.encode`, with precomputed
    output); for timing the decoder on its own."""

    def __init__(self, model, features):
        self.vis, self.features = model.transformer.visual, features

    def __enter__(self):
        self.vis.encode = lambda paths: self.features
        return self

    def __exit__(self, *exc):
        del self.vis.encode


def official_sweep_cases(model, ids, pix, mask) -> dict:
    """The torch side of bench_sweep for Qwen-VL, on the official model (closures, numpy outputs):
      torch_forward  one official forward (`reference.logits`), all logits
      torch_loop     one official forward per cut layer K = 0..L, each with the image-token keys
                     (the 256 <imgpad> columns) masked from layer K on: finfo(float32).min added to the
                     additive mask that every decoder block l >= K receives (a forward pre-hook, as
                     tests/golden/qwen_vl/make_golden.py does); the logits from </img> on, like
                     sweep_cases' forward_loop
    K = L is the plain forward."""
    import torch

    qref = qwen_vl_reference()
    blocks = model.transformer.h
    img = np.asarray(ids) == _official_image_token(model)
    after = np.arange(int(np.flatnonzero(img[0])[-1]) + 1, ids.shape[1])
    add = torch.where(torch.as_tensor(img)[:, None, None, :], torch.tensor(torch.finfo(torch.float32).min),
                      torch.tensor(0.0))

    def hook(_mod, args, kwargs):
        if kwargs.get("attention_mask") is None:
            raise RuntimeError("the official block got no attention_mask (pass one)")
        return args, {**kwargs, "attention_mask": kwargs["attention_mask"] + add}

    def masked(k):
        hs = [blk.register_forward_pre_hook(hook, with_kwargs=True) for i, blk in enumerate(blocks) if i >= k]
        try:
            return qref.logits(model, ids, pix, mask)[:, after]
        finally:
            for h in hs:
                h.remove()

    return {"torch_forward": lambda: qref.logits(model, ids, pix, mask),
            "torch_loop": lambda: [masked(k) for k in range(len(blocks) + 1)]}


def official_cam_cases(model, ids, pix, mask, answer_mask) -> dict:
    """The torch side of bench_cam for Qwen-VL, on the official model (closures, numpy outputs):
      torch_forward     one official forward (`reference.logits`)
      torch_cam         the paper's LLaVA-CAM of every layer by autograd as
                        tests/golden/qwen_vl/make_golden.py computes it: forward hooks keep each block's
                        ln_2 output (the MLP input), one forward with the pixel feed and one backward of
                        sum_p logits[b, p-1, ids[b, p]] over the answer tokens, weights requiring grad as
                        loaded; map = relu(mean_D(mean_N(relu(g)) * h)) at the 256 <imgpad> positions
      torch_cam_frozen  the same with every weight frozen (requires_grad False), so the backward
                        computes activation gradients only, as jaxflow's does
    Each returns the raw maps (B, L, 256) float32."""
    import torch

    qref = qwen_vl_reference()
    ids = np.asarray(ids)
    b_n = ids.shape[0]
    img_pos = torch.as_tensor(np.stack([np.flatnonzero(r == _official_image_token(model)) for r in ids]))
    bidx = torch.arange(b_n)[:, None]
    terms = [(b, int(p)) for b in range(b_n) for p in np.flatnonzero(np.asarray(answer_mask)[b])]
    ids_t = torch.as_tensor(ids.astype(np.int64))
    pix_t = torch.as_tensor(np.ascontiguousarray(pix, dtype=np.float32))
    am_t = torch.as_tensor(np.asarray(mask).astype(np.int64))
    params = list(model.parameters())

    def cam(frozen: bool):
        outs = []

        def keep(_mod, _inp, out):
            if out.requires_grad:
                out.retain_grad()
            else:  # frozen weights: the first kept output starts the graph
                out.requires_grad_(True)
            outs.append(out)

        flags = [p.requires_grad for p in params]
        if frozen:
            for p in params:
                p.requires_grad_(False)
        hs = [blk.ln_2.register_forward_hook(keep) for blk in model.transformer.h]
        try:
            with torch.enable_grad(), qref._feed_pixels(model, pix_t):
                lg = model(input_ids=ids_t, attention_mask=am_t, use_cache=False, return_dict=True).logits
            torch.stack([lg[b, p - 1, int(ids[b, p])] for b, p in terms]).sum().backward()
        finally:
            for h in hs:
                h.remove()
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.zero_grad(set_to_none=True)
        with torch.no_grad():
            g = torch.stack([o.grad[bidx, img_pos] for o in outs], 1)  # (B, L, N, D)
            h = torch.stack([o.detach()[bidx, img_pos] for o in outs], 1)
            return torch.relu((torch.relu(g).mean(-2, keepdim=True) * h).mean(-1)).numpy()

    return {"torch_forward": lambda: qref.logits(model, ids, pix, mask),
            "torch_cam": lambda: cam(False), "torch_cam_frozen": lambda: cam(True)}


# --------------------------------------------------------------------------- inputs


def bench_inputs(batch: int = 4, text_tokens: int = 64, seed: int = 0, config: BenchConfig | str | None = None):
    """The bench config's numpy inputs (default LLaVA; LLaVA, InternVL and Qwen-VL): input_ids (B, N +
    text_tokens) int64, attention_mask all ones, pixel_values float32; see `BenchConfig.inputs`
    (`BenchConfig.inputs_kw` for any family)."""
    return _as_config(config).inputs(batch, text_tokens, seed)


# --------------------------------------------------------------------------- what the benchmarks time


def results_path(benchmark: str, config: BenchConfig) -> str:
    """benchmarks/results/<benchmark>.json for LLaVA (the historical name), <benchmark>-<config>.json else."""
    name = benchmark if config.name == "llava" else f"{benchmark}-{config.name}"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")


def sweep_cases(model, ids, pix, mask, new_tokens: int = 16, image_kw: dict | None = None) -> dict:
    """bench_sweep's measurements on these inputs, as closures (public functions only, every output
    brought to the host as numpy, so the sweep pays for its (L+1, B, T_after, vocab) logits as the
    loop pays for L+1 gathers):
      forward              `jaxflow.forward` logits -> numpy (the unit)
      sweep                `jaxflow.truncation_sweep`, all L+1 cut layers
      forward_loop         `jaxflow.forward(..., truncate_at=K)` for K = 0..L, logits after the image
      generate             `jaxflow.generate`, new_tokens tokens
      truncation_generate  `jaxflow.truncation_generate`, all L+1 variants
      generate_loop        `jaxflow.generate(..., truncate_at=K)` for K = 0..L
    image_kw: the family's image arguments, passed to every call (`BenchConfig.inputs_kw`; Qwen2-VL:
    image_grid_thw). Works with every jaxflow version that has these functions (bench_refactor runs it
    on old trees; it passes no image_kw)."""
    import jaxflow

    kw = dict(image_kw or {})
    L = model.config.text.num_layers
    after = np.arange(int(np.flatnonzero(ids[0] == model.config.image_token_id)[-1]) + 1, ids.shape[1])

    def gen(**more):
        return jaxflow.generate(model, ids, pix, mask, max_new_tokens=new_tokens, eos_token_id=-1, **more,
                                **kw).tokens

    return {
        "forward": lambda: np.asarray(jaxflow.forward(model, ids, pix, mask, **kw).logits),
        "sweep": lambda: jaxflow.truncation_sweep(model, ids, pix, mask, **kw).logits,
        "forward_loop": lambda: [np.asarray(jaxflow.forward(model, ids, pix, mask, truncate_at=k,
                                                            **kw).logits[:, after]) for k in range(L + 1)],
        "generate": gen,
        "truncation_generate": lambda: jaxflow.truncation_generate(model, ids, pix, mask, max_new_tokens=new_tokens,
                                                                   eos_token_id=-1, **kw).tokens,
        "generate_loop": lambda: [gen(truncate_at=k) for k in range(L + 1)],
    }


def cam_cases(model, ids, pix, mask, answer_mask, extras: bool = True, image_kw: dict | None = None) -> dict:
    """bench_cam's measurements on these inputs (batch 1 there), as closures (public functions only):
      forward   `jaxflow.forward` (fused attention, all logits, on the device) -- the unit
      cam       `llava_cam(..., "paper")`: every layer's map from one forward and one backward
      loop      `cam_site(..., per_layer_loop=True)`: per layer its own forward and backward
      extras    cam_per_token, cam_smoothgrad4, attention_shares, information_flow
    image_kw: the family's image arguments, passed to every call (`BenchConfig.inputs_kw`; Qwen2-VL:
    image_grid_thw). Works with every jaxflow version that has these functions (bench_refactor runs it
    on old trees; it passes no image_kw)."""
    import jaxflow
    from jaxflow.analysis.cam import cam_site, llava_cam

    kw = dict(image_kw or {})
    amask = answer_mask
    cases = {
        "forward": lambda: jaxflow.forward(model, ids, pix, mask, **kw).logits,
        "cam": lambda: llava_cam(model, ids, pix, amask, "paper", attention_mask=mask, **kw),
        "loop": lambda: cam_site(model, ids, pix, amask, attention_mask=mask, per_layer_loop=True, **kw),
    }
    if extras:
        from jaxflow.analysis.attention import attention_shares
        from jaxflow.analysis.cam import llava_cam_per_token, llava_cams
        from jaxflow.analysis.flow import information_flow

        cases.update({
            "cam_per_token": lambda: llava_cam_per_token(model, ids, pix, amask, "paper", attention_mask=mask,
                                                         **kw)[0],
            "cam_smoothgrad4": lambda: llava_cams(model, ids, pix, amask, ("paper",), attention_mask=mask,
                                                  smooth_n=4, **kw).maps["paper"],
            "attention_shares": lambda: attention_shares(model, ids, pix, attention_mask=mask, answer_mask=amask,
                                                         **kw),
            "information_flow": lambda: information_flow(model, ids, pix, amask, attention_mask=mask, **kw).flows,
        })
    return cases


def answer_mask(ids, answer_tokens: int):
    """(B, T) bool: the last `answer_tokens` tokens of every row are the answer (teacher-forced target)."""
    amask = np.zeros(ids.shape, bool)
    amask[:, -answer_tokens:] = True
    return amask


def goal_line(what: str, value: float, goal_key: str) -> str:
    """'<what> = 2.41x (goal <= 3; met)' or '... MISSED by 0.4x (13%)' for a ratio with a GOALS entry."""
    goal = GOALS[goal_key]
    if goal_key.endswith("_max"):
        ok, sign = value <= goal, "<="
    else:
        ok, sign = value > goal, ">"
    miss = "" if ok else f" by {abs(value - goal):.2f}x ({100 * abs(value / goal - 1):.0f}%)"
    return f"{what} = {value:.2f}x (goal {sign} {goal:g}: {'met' if ok else 'MISSED' + miss})"


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
