"""Hugging Face LLaVA safetensors -> jaxflow parameter tree, strict and streaming.

The target structure and shapes come from the model definition itself (an abstract `Llava` built
with `nnx.eval_shape`), so every parameter the model has must be found, every tensor in the files
must be used, and every shape is checked against what the model expects. Tensors are read one at a
time (numpy, bf16 through ml_dtypes, no torch) into preallocated stacked arrays of the output dtype,
so peak host memory is about the output weights plus one tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read bf16)
import numpy as np



class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says why."""


# --------------------------------------------------------------------------- key layouts


def canonical_key(key: str) -> str:
    """Maps every LLaVA / InternVL key layout transformers has written to one canonical form:
    `vision_tower.<clip>`, `multi_modal_projector.*`, `language_model.<llama model>`, `lm_head.weight`.

    Handled: v5 in-memory `model.language_model.*` / `model.vision_tower.*` / `model.multi_modal_projector.*`
    / `model.visual.*`; v4 files `language_model.model.*` and `language_model.lm_head.weight`;
    `vision_tower.vision_model.*`; Qwen2-VL files `model.layers.*` / `model.embed_tokens.*` / `model.norm.*`
    (the decoder) and `visual.*`.
    """
    k = key
    if k.startswith("model.") and k.split(".")[1] in ("layers", "embed_tokens", "norm"):
        return "language_model." + k[len("model."):]  # Qwen2-VL as saved: model.layers.*, visual.*, lm_head
    for head in ("language_model.", "vision_tower.", "multi_modal_projector.", "visual."):
        if k.startswith("model." + head):
            k = k[len("model."):]
    if k == "language_model.lm_head.weight":
        return "lm_head.weight"
    if k.startswith("language_model.model."):
        k = "language_model." + k[len("language_model.model."):]
    if k.startswith("vision_tower.vision_model."):
        k = "vision_tower." + k[len("vision_tower.vision_model."):]
    return k


@dataclass(frozen=True)
class Source:
    """Where one parameter comes from: HF keys (one per layer when stacked) and a transform."""
    keys: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray]
    stacked: bool


_ident = lambda a: a  # noqa: E731
_transpose = lambda a: a.T  # noqa: E731


def _rule_source(path: tuple[str, ...], layer_prefix: str, num_layers: int) -> Source:
    """The common rule: our dotted path with `kernel`/`scale` -> `weight` (kernels transposed), and the
    stacked `layers` axis -> one key per layer under `layer_prefix`."""
    leaf = path[-1]
    name = {"scale": "weight", "kernel": "weight", "bias": "bias"}[leaf]
    transform = _transpose if leaf == "kernel" else _ident
    if path[1] == "layers":
        mid = ".".join(path[2:-1])
        return Source(tuple(f"{layer_prefix}.{i}.{mid}.{name}" for i in range(num_layers)), transform, True)
    return Source((".".join(path[:-1]) + "." + name,), transform, False)


def _text_source(path: tuple[str, ...], cfg) -> Source:
    """The decoder (`language_model.*`) and the LM head: the same layout for every family whose
    decoder is Llama-like (LLaVA's Llama, InternVL's Qwen2)."""
    if path[1] == "lm_head":
        return Source(("lm_head.weight",), _transpose, False)
    if path[1] == "embed_tokens":
        return Source(("language_model.embed_tokens.weight",), _ident, False)
    return _rule_source(path, "language_model.layers", cfg.text.num_layers)


def llava_param_source(path: tuple[str, ...], cfg) -> Source:
    """HF source of the parameter at `path` in a Llava tree (e.g. ('language_model','layers','mlp',...))."""
    top = path[0]
    if top == "language_model":
        return _text_source(path, cfg)
    if top == "vision_tower" and path[1] == "patch_embedding":
        d = cfg.vision.hidden_size
        return Source(("vision_tower.embeddings.patch_embedding.weight",), lambda a: a.reshape(d, -1).T, False)
    if top == "vision_tower" and path[1] in ("class_embedding", "position_embedding"):
        suffix = "" if path[1] == "class_embedding" else ".weight"
        return Source((f"vision_tower.embeddings.{path[1]}{suffix}",), _ident, False)
    return _rule_source(path, "vision_tower.encoder.layers", cfg.vision.num_layers)


def internvl_param_source(path: tuple[str, ...], cfg) -> Source:
    """HF source of a parameter of an InternVL tree: the vision tower and projector from the
    InternViT key table (`jaxflow.models.internvit.hf_source`), the decoder as for every family."""
    if path[0] == "language_model":
        return _text_source(path, cfg)
    from jaxflow.models.internvit import HF_TRANSFORMS, hf_source

    keys, transform, stacked = hf_source(path, cfg.vision)
    return Source(tuple(keys), HF_TRANSFORMS[transform], stacked)


def qwen2_vl_param_source(path: tuple[str, ...], cfg) -> Source:
    """HF source of a parameter of a Qwen2-VL / Qwen2.5-VL tree: the vision tower from its key table
    (`jaxflow.models.qwen2_vit.hf_source`), the decoder as for every family."""
    if path[0] == "language_model":
        return _text_source(path, cfg)
    from jaxflow.models.qwen2_vit import HF_TRANSFORMS, hf_source

    keys, transform, stacked = hf_source(path, cfg.vision)
    return Source(tuple(keys), HF_TRANSFORMS[transform], stacked)


def qwen_vl_param_source(path: tuple[str, ...], cfg) -> Source:
    """Official source of a parameter of a Qwen-VL tree (`jaxflow.models.qwen_vl.hf_source`: the fused
    c_attn and the ViT's per-head in_proj split into q, k, v)."""
    from jaxflow.models.qwen_vl import hf_source

    keys, transform, stacked = hf_source(path, cfg)
    return Source(tuple(keys), transform, stacked)


def _flatten(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], object]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# --------------------------------------------------------------------------- safetensors index


def index_safetensors(hf_dir: str) -> dict[str, str]:
    """canonical key -> file, over a single model.safetensors or a sharded set with its index."""
    from safetensors import safe_open

    index_file = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index_file):
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index_file} is not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        weight_map = None
    if not files:
        raise ConversionError(f"no *.safetensors files in {hf_dir} (convert .bin checkpoints with transformers' "
                              "save_pretrained(safe_serialization=True) first)")
    where: dict[str, str] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            raise ConversionError(f"{path} is listed in the index but missing")
        try:
            with safe_open(path, framework="np") as f:
                keys = list(f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ConversionError(f"cannot read {path}: {e} (truncated or corrupt file?)") from e
        for k in keys:
            ck = canonical_key(k)
            if ck in where:
                raise ConversionError(f"tensor {k!r} appears twice (as {ck!r}) in {hf_dir}")
            where[ck] = path
    if weight_map is not None:
        missing = sorted(k for k in weight_map if canonical_key(k) not in where)
        if missing:
            raise ConversionError(f"the index lists {len(missing)} tensor(s) not found in their files: "
                                  f"{', '.join(missing[:8])}")
    return where


class _FileStore:
    """Tensors of a safetensors directory, by canonical key, read one at a time. safetensors
    memory-maps the file; opening it per tensor releases the mapping after each read, so pages
    already copied out do not stay resident."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.label = hf_dir
        self.where = index_safetensors(hf_dir)
        self.raw: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        for path in sorted(set(self.where.values())):
            with safe_open(path, framework="np") as f:
                for k in f.keys():
                    self.raw[canonical_key(k)] = k
                    try:
                        self.shapes[canonical_key(k)] = tuple(f.get_slice(k).get_shape())
                    except Exception as e:  # noqa: BLE001
                        raise ConversionError(f"cannot read the header of {k!r} in {path}: {e}") from e

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, canon: str) -> np.ndarray:
        from safetensors import safe_open

        raw, path = self.raw[canon], self.where[canon]
        try:
            with safe_open(path, framework="np") as f:
                return f.get_tensor(raw)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"cannot read tensor {raw!r} from {path}: {e} (truncated or corrupt file?)") from e


class _MemoryStore:
    """Tensors of an in-memory state dict (torch tensors, numpy or jax arrays), by canonical key.
    torch tensors cross to jax through DLPack, without a copy and on their own device."""

    def __init__(self, tensors, label: str = "the state dict"):
        self.label = label
        self.tensors: dict[str, object] = {}
        for k, t in tensors.items():
            ck = canonical_key(k)
            if ck in self.tensors:
                raise ConversionError(f"tensor {k!r} appears twice (as {ck!r}) in {label}")
            self.tensors[ck] = t
        self.shapes = {k: tuple(t.shape) for k, t in self.tensors.items()}

    def keys(self) -> set[str]:
        return set(self.tensors)

    def get(self, canon: str):
        import jax

        t = self.tensors[canon]
        if isinstance(t, (np.ndarray, jax.Array)):
            return t
        if hasattr(t, "detach"):  # torch
            t = t.detach().contiguous()
        return jax.dlpack.from_dlpack(t)


def convert_params(hf_dir: str, cfg, abstract: dict, dtype, progress=None) -> dict:
    """Reads the HF tensors into a nested dict shaped like `abstract` (all in memory at once; the
    converter streams with `iter_params` instead)."""
    out: dict = {}
    for path, arr in iter_params(hf_dir, cfg, abstract, dtype, progress):
        _set(out, path, arr)
    return out


def iter_params(hf_dir: str, cfg, abstract: dict, dtype, progress=None):
    """Yields (path, numpy array) for every parameter of `abstract` (a pure dict of ShapeDtypeStruct),
    one at a time, so a writer can store and drop each before the next is read.

    Raises ConversionError listing missing keys, unused keys or shape mismatches, all found from the
    file headers before any tensor data is read.
    """
    store = _FileStore(hf_dir)
    for path, spec, src in _plan(store, cfg, abstract):
        arr = np.empty(spec.shape, dtype)
        for i, key in enumerate(src.keys):
            t = src.transform(store.get(key))
            if src.stacked:
                arr[i] = t.astype(dtype, copy=False)
            else:
                arr[...] = t.astype(dtype, copy=False)
        yield path, arr
        del arr
        if progress is not None:
            progress(".".join(map(str, path)))


def iter_params_in_memory(tensors, cfg, abstract: dict, dtype, progress=None):
    """As `iter_params`, from an in-memory state dict (name -> torch tensor / numpy / jax array, in any
    key layout transformers uses); yields jax arrays on the tensors' own device."""
    import jax.numpy as jnp

    store = _MemoryStore(tensors)
    for path, spec, src in _plan(store, cfg, abstract):
        parts = [jnp.asarray(src.transform(store.get(key)), dtype) for key in src.keys]
        arr = jnp.stack(parts) if src.stacked else parts[0]
        del parts
        yield path, arr
        if progress is not None:
            progress(".".join(map(str, path)))


def _plan(store, cfg, abstract: dict) -> list:
    """[(path, spec, Source)] for every parameter of `abstract`, after checking that the store holds
    exactly the tensors the model needs, each of the right shape (ConversionError otherwise)."""
    from jaxflow.models.family import family_of

    param_source = family_of(cfg).param_source
    plan = []
    needed: set[str] = set()
    for path, spec in _flatten(abstract):
        src = param_source(path, cfg)
        plan.append((path, spec, src))
        needed.update(src.keys)
    have = store.keys()
    missing = sorted(needed - have)
    unused = sorted(have - needed)
    if cfg.tie_word_embeddings and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")  # tied: transformers ignores a stored lm_head too
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if unused:
        problems.append(f"{len(unused)} unused tensor(s): {', '.join(unused[:10])}"
                        + (" ..." if len(unused) > 10 else ""))
    if problems:
        raise ConversionError(f"{store.label} does not match the {cfg.family} model its config.json describes: "
                              + "; ".join(problems))
    bad = []
    for path, spec, src in plan:  # shapes from the headers alone, before reading any data
        per = spec.shape[1:] if src.stacked else spec.shape
        for key in src.keys:
            try:
                got = src.transform(np.empty(store.shapes[key], np.uint8)).shape
            except ValueError:
                got = None
            if got is None or tuple(got) != tuple(per):
                bad.append(f"{key}: file {store.shapes[key]} but the config implies {_untransform_shape(src, per)}")
                break
    if bad:
        raise ConversionError(f"{len(bad)} tensor(s) with the wrong shape: " + "; ".join(bad[:6]))
    return plan


def _untransform_shape(src: Source, shape):
    probe = np.empty(shape, np.uint8)
    if src.transform is _transpose:
        return tuple(probe.T.shape)
    return tuple(shape)
