"""From files to model inputs and answers: what the scripts do, as library functions."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxflow.data.image import ImageSpec, load_image, preprocess_images
from jaxflow.data.prompts import EncodedBatch, encode_batch, format_prompt, token_spans
from jaxflow.models.family import VisionLanguageModel

IMAGE_TOKEN = "<image>"  # the placeholder of LLaVA prompts (format_prompt's default)


@dataclasses.dataclass
class Bundle:
    """A model with what it needs to read images and text. image_spec: the family's image settings
    (LLaVA: an ImageSpec; InternVL: an InternVLImageConfig; Qwen2-VL: a Qwen2VLImageConfig)."""
    model: VisionLanguageModel
    tokenizer: object
    image_spec: object
    name: str
    template: str = "vicuna_v1"

    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def image_token(self) -> str:
        """The prompt placeholder that the image's tokens replace."""
        return IMAGE_TOKEN if self.family == "llava" else self.tokenizer.convert_ids_to_tokens(
            self.config.image_token_id)


@dataclasses.dataclass
class EncodedImages:
    """Images as the family's processor gives them, plus what the analyses need to place maps."""
    pixel_values: np.ndarray  # the family's layout (LLaVA (n, 3, H, W); InternVL (tiles, 3, S, S); Qwen2-VL
    # (patches, C*t*p*p)) float32
    counts: np.ndarray  # (n,) int: entries of pixel_values per image (InternVL: tiles incl. thumbnail; Qwen: patches)
    tokens: np.ndarray  # (n,) int: image tokens per image in the prompt
    image_kw: dict  # the family's extra image arguments, one entry per image (InternVL: tile_grids; Qwen2-VL:
    # image_grid_thw)
    layouts: list | None = None  # per image, how the model input covers the original (InternVL tiles, Qwen grids)

    def rows(self, idx) -> np.ndarray:
        """pixel_values of the images `idx` (a list of image indices), in that order."""
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        return np.concatenate([self.pixel_values[starts[i]:starts[i + 1]] for i in idx])

    def kw_rows(self, idx) -> dict:
        """image_kw of the images `idx`, in that order (goes with `rows(idx)`)."""
        out = {}
        for k, v in self.image_kw.items():
            picked = [v[i] for i in idx]
            out[k] = np.asarray(picked) if isinstance(v, np.ndarray) else picked
        return out


DEFAULT_MODEL_NAME = "toy-llava"  # what checkpoint=None loads: the trained toy model in jaxflow/assets/toy_llava


def default_checkpoint() -> str:
    """The directory of the embedded default model (the toy LLaVA trained by scripts/train_toy.py)."""
    from jaxflow.convert import CheckpointError
    from jaxflow.toy import TOY_CHECKPOINT

    if not os.path.isfile(os.path.join(TOY_CHECKPOINT, "config.json")):
        raise CheckpointError(f"the embedded toy checkpoint is missing from {TOY_CHECKPOINT}: reinstall jaxflow "
                              "(it ships as package data) or pass --checkpoint")
    return TOY_CHECKPOINT


def checkpoint_name(checkpoint: str | None) -> str:
    """The model name of a checkpoint directory (None, or the embedded model's own path: the default's
    name)."""
    from jaxflow.toy import TOY_CHECKPOINT

    if checkpoint is None or os.path.realpath(checkpoint) == os.path.realpath(TOY_CHECKPOINT):
        return DEFAULT_MODEL_NAME
    return os.path.basename(os.path.normpath(checkpoint))


def default_template(checkpoint: str | None) -> str:
    """The prompt template a checkpoint expects: the "template" of its toy.json if it has one (models
    trained by jaxflow.toy, the embedded default too: "llava_hf"), "internvl" for an InternVL
    checkpoint, "qwen2_vl" for a Qwen2-VL / Qwen2.5-VL one, "qwen_vl" for a Qwen-VL one, else LLaVA-1.5's
    "vicuna_v1"."""
    root = default_checkpoint() if checkpoint is None else checkpoint
    meta = os.path.join(root, "toy.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                return str(json.load(f).get("template") or "vicuna_v1")
        except (OSError, ValueError):
            pass
    try:
        with open(os.path.join(root, "config.json")) as f:
            model_type = json.load(f).get("model_type")
        if model_type == "internvl":
            return "internvl"
        if model_type in ("qwen2_vl", "qwen2_5_vl"):
            return "qwen2_vl"
        if model_type == "qwen":
            return "qwen_vl"
    except (OSError, ValueError):
        pass
    return "vicuna_v1"


def load_bundle(checkpoint: str | None = None, *, template: str | None = None, dtype: str | None = None,
                mesh=None, rules: str = "tp") -> Bundle:
    """A converted checkpoint (model, its tokenizer, its image processor settings), or with
    checkpoint=None the embedded toy model ("toy-llava"). template None: the checkpoint's own
    (`default_template`). mesh / rules: shard the model (`jaxflow.load`)."""
    template = template or default_template(checkpoint)
    if checkpoint is None:
        return _load_dir(default_checkpoint(), DEFAULT_MODEL_NAME, template, dtype, mesh, rules)
    return _load_dir(checkpoint, checkpoint_name(checkpoint), template, dtype, mesh, rules)


def bundle_for(checkpoint: str | None, bundle: Bundle | None = None, *, template: str | None = None,
               progress=None, mesh=None, rules: str = "tp") -> Bundle:
    """The bundle an entry point runs on: `bundle` if the caller already loaded one (with `template`
    applied when given), else `load_bundle(checkpoint, template=template, mesh=mesh, rules=rules)`,
    reporting the load through `progress`. A checkpoint that cannot be loaded raises ValueError (one line)."""
    from jaxflow.convert import CheckpointError

    if bundle is not None:
        return bundle if template is None or template == bundle.template else dataclasses.replace(bundle, template=template)
    if progress:
        progress(f"loading {'the embedded toy model' if checkpoint is None else checkpoint}")
    try:
        return load_bundle(checkpoint, template=template, mesh=mesh, rules=rules)
    except (CheckpointError, OSError) as e:
        raise ValueError(str(e)) from e


def _load_dir(checkpoint: str, name: str, template: str, dtype: str | None, mesh=None, rules: str = "tp") -> Bundle:
    from jaxflow.convert.checkpoint import CheckpointError, corrupt_json

    try:
        return _load_parts(checkpoint, name, template, dtype, mesh, rules)
    except (ValueError, OSError) as e:
        if isinstance(e, CheckpointError):
            raise
        bad = corrupt_json(checkpoint)  # an image-processor JSON error does not name its file
        if bad:
            raise CheckpointError(bad) from e
        raise


def _load_parts(checkpoint: str, name: str, template: str, dtype: str | None, mesh=None, rules: str = "tp") -> Bundle:
    from jaxflow.convert import load, load_tokenizer

    model = load(checkpoint, dtype=dtype, mesh=mesh, rules=rules)
    if model.family == "internvl":
        return Bundle(model, load_tokenizer(checkpoint), _internvl_image_config(checkpoint, model), name=name,
                      template=template)
    if model.family in ("qwen2_vl", "qwen2_5_vl"):
        return Bundle(model, load_tokenizer(checkpoint), _qwen2_vl_image_config(checkpoint, model), name=name,
                      template=template)
    has_spec = any(os.path.exists(os.path.join(checkpoint, f))
                   for f in ("preprocessor_config.json", "processor_config.json"))
    if model.family == "qwen_vl" and not has_spec:  # the official transform: a bicubic squash to S x S
        n = model.config.vision.image_size
        spec = ImageSpec(resize_hw=(n, n), crop_size=(n, n), do_center_crop=False)
    else:
        spec = ImageSpec.from_pretrained_dir(checkpoint) if has_spec else ImageSpec.for_size(
            model.config.vision.image_size)
    if spec.output_hw != (model.config.vision.image_size,) * 2:
        raise ValueError(f"{checkpoint}: the image processor crops to {spec.output_hw} but the vision tower "
                         f"expects {model.config.vision.image_size} px")
    return Bundle(model, load_tokenizer(checkpoint), spec, name=name, template=template)


def _internvl_image_config(checkpoint: str, model):
    from jaxflow.data.internvl_image import internvl_image_config

    cfg = None
    for fname in ("preprocessor_config.json", "processor_config.json"):
        f = os.path.join(checkpoint, fname)
        if os.path.isfile(f):
            with open(f) as fh:
                cfg = json.load(fh)
            break
    spec = internvl_image_config(cfg)
    if (spec.tile_height, spec.tile_width) != (model.config.vision.image_size,) * 2:
        raise ValueError(f"{checkpoint}: the image processor makes {spec.tile_height} px tiles but the vision "
                         f"tower expects {model.config.vision.image_size} px")
    return spec


def _qwen2_vl_image_config(checkpoint: str, model):
    from jaxflow.data.qwen2_vl_image import qwen2_vl_image_config

    has = any(os.path.isfile(os.path.join(checkpoint, f)) for f in ("preprocessor_config.json", "processor_config.json"))
    spec = qwen2_vl_image_config(checkpoint if has else None)
    v = model.config.vision
    got = (spec.patch_size, spec.temporal_patch_size, spec.merge_size)
    want = (v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    if got != want:
        raise ValueError(f"{checkpoint}: the image processor makes patches (patch, temporal, merge) {got} but the "
                         f"vision tower expects {want}")
    return spec


def check_pad_square(bundle: Bundle, pad_square: bool, error=ValueError) -> None:
    """pad_square is LLaVA's evaluation option: one clear line on any other family."""
    if pad_square and bundle.family != "llava":
        raise error(f"--pad_square is LLaVA-only: {bundle.name!r} is a model of the {bundle.family!r} family, "
                    "which does not pad images to a square")


def image_token_count(ids: np.ndarray, mask: np.ndarray, image_token_id: int) -> int:
    """Image tokens of one row, counted in its ids (padding excluded)."""
    return int(((np.asarray(ids) == image_token_id) & (np.asarray(mask) > 0)).sum())


def encode_images(bundle: Bundle, images, *, pad_square: bool = False) -> EncodedImages:
    """Images (paths or PIL images) -> the family's pixel values and layout."""
    check_pad_square(bundle, pad_square)
    pil = [load_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
    n = len(pil)
    if bundle.family == "internvl":
        from jaxflow.data.internvl_image import preprocess_internvl

        px = preprocess_internvl(pil, bundle.image_spec)
        counts = np.asarray(px.num_patches, np.int64)
        return EncodedImages(px.pixel_values, counts, counts * bundle.config.tokens_per_tile,
                             {"tile_grids": [lay.grid for lay in px.layouts]}, list(px.layouts))
    if bundle.family in ("qwen2_vl", "qwen2_5_vl"):
        from jaxflow.data.qwen2_vl_image import preprocess_qwen2_vl

        px = preprocess_qwen2_vl(pil, bundle.image_spec)
        return EncodedImages(px.pixel_values, np.asarray(px.num_patches, np.int64), np.asarray(px.num_tokens, np.int64),
                             {"image_grid_thw": np.asarray(px.image_grid_thw, np.int64)}, list(px.layouts))
    pixels = preprocess_images(pil, bundle.image_spec, pad_square=pad_square)
    return EncodedImages(pixels, np.ones(n, np.int64), np.full(n, bundle.config.num_image_tokens, np.int64), {})


def format_prompts(bundle: Bundle, questions: list[str]) -> list[str]:
    """Each question in the bundle's prompt template, with one image placeholder."""
    return [format_prompt(q, bundle.template, bundle.image_token, tokenizer=bundle.tokenizer) for q in questions]


# The scripts' sequence-length bucket: a prompt (with its answer) is left-padded to a multiple of this
# many tokens, so questions of similar length share one compiled program (and its cache entry).
SCRIPT_LENGTH_BUCKET = 32


def length_bucket_for(bundle: Bundle, length_bucket: int | None) -> int | None:
    """The bucket to use for a bundle's model: None where left padding changes the results (a model
    whose `left_padding_invariant` is False: Qwen-VL)."""
    return length_bucket if getattr(bundle.model, "left_padding_invariant", True) else None


def pad_to_bucket(batch: EncodedBatch, length_bucket: int, pad_id: int) -> EncodedBatch:
    """Left-pads a batch (B, T) to (B, T') with T' the next multiple of length_bucket; padding is
    masked out, so every row computes what it computes unpadded (positions count real tokens)."""
    b, t = batch.input_ids.shape
    extra = -(-t // length_bucket) * length_bucket - t
    if extra == 0:
        return batch
    return EncodedBatch(
        input_ids=np.concatenate([np.full((b, extra), pad_id, batch.input_ids.dtype), batch.input_ids], 1),
        attention_mask=np.concatenate([np.zeros((b, extra), batch.attention_mask.dtype), batch.attention_mask], 1),
        answer_mask=np.concatenate([np.zeros((b, extra), bool), batch.answer_mask], 1),
        prompt_lengths=batch.prompt_lengths)


def encode(bundle: Bundle, images, questions: list[str], answers: list | None = None, *,
           pad_square: bool = False, padding_side: str = "left", with_images: bool = False,
           length_bucket: int | None = None):
    """Images (paths or PIL images) and questions (and optional answers: strings or token-id lists)
    -> (EncodedBatch, pixel_values) (the family's layout: LLaVA (B, 3, H, W), InternVL the tiles of
    the B images), or (EncodedBatch, EncodedImages) with with_images=True. length_bucket: left-pad
    the batch to a multiple of that many tokens (`length_bucket_for`: not for Qwen-VL)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    enc = encode_images(bundle, images, pad_square=pad_square)
    batch = encode_batch(bundle.tokenizer, format_prompts(bundle, questions), image_token=bundle.image_token,
                         image_token_id=bundle.config.image_token_id, num_image_tokens=enc.tokens.tolist(),
                         answers=answers, padding_side=padding_side)
    bucket = length_bucket_for(bundle, length_bucket)
    if bucket and bucket > 1 and padding_side == "left":
        from jaxflow.data.prompts import _resolve_pad_id

        batch = pad_to_bucket(batch, int(bucket), _resolve_pad_id(bundle.tokenizer, None))
    return (batch, enc) if with_images else (batch, enc.pixel_values)


def decode_answers(tokenizer, tokens: np.ndarray, lengths: np.ndarray, eos_ids=()) -> list[str]:
    """Generated ids (B, N) with per-row lengths -> strings, EOS dropped."""
    out = []
    for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
        ids = [int(t) for t in row[:n] if int(t) not in set(eos_ids)]
        out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


@dataclasses.dataclass
class Answers:
    texts: list[str]  # decoded, EOS and special tokens dropped
    token_ids: list[list[int]]  # generated ids per row, EOS dropped: the answer to teacher-force


def answer(bundle: Bundle, images, questions: list[str], *, max_new_tokens: int = 32, pad_square: bool = False,
           truncate_at: int | None = None, length_bucket: int | None = None) -> Answers:
    """Greedy answers, one per (image, question) (length_bucket: as `encode`)."""
    from jaxflow.generate import generate

    batch, enc = encode(bundle, images, questions, pad_square=pad_square, with_images=True,
                        length_bucket=length_bucket)
    gen = generate(bundle.model, batch.input_ids, enc.pixel_values, batch.attention_mask,
                   max_new_tokens=max_new_tokens, truncate_at=truncate_at, **enc.image_kw)
    eos = set(bundle.config.text.eos_token_id)
    ids = [[int(t) for t in row[:n] if int(t) not in eos] for row, n in zip(gen.tokens, gen.lengths)]
    return Answers(decode_answers(bundle.tokenizer, gen.tokens, gen.lengths, tuple(eos)), ids)


def spans_summary(batch: EncodedBatch, image_token_id: int) -> list[dict]:
    """Per row, the [start, end) of the token groups S, T, U, A, from the ids."""
    spans = token_spans(batch.input_ids, batch.attention_mask, image_token_id, batch.answer_mask)
    return [{g: (list(r) if r is not None else None) for g, r in row.items()} for row in spans.ranges()]


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (a temp file renamed into place)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
