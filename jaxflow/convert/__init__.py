"""Conversion of transformers LLaVA checkpoints and jaxflow's own checkpoint format."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import ml_dtypes  # noqa: F401
import numpy as np

from jaxflow.convert.checkpoint import (DTYPES, CheckpointError, abstract_params, load, load_tokenizer,
                                        save_model, write_checkpoint)
from jaxflow.convert.hf import ConversionError, canonical_key, iter_params, iter_params_in_memory
from jaxflow.models.config import ConfigError
from jaxflow.models.family import config_from_hf_dict

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "qwen.tiktoken")


def convert_checkpoint(hf_dir: str, out: str, dtype: str = "float32", *, overwrite: bool = False,
                       progress: bool = True, allow_no_tokenizer: bool = False) -> str:
    """Converts a checkpoint directory of any supported family (config.json + *.safetensors, single or
    sharded: transformers' LLaVA, InternVL -hf, Qwen2-VL, Qwen2.5-VL, or the official Qwen-VL layout)
    to a jaxflow checkpoint at `out`, with the tokenizer (Qwen-VL's `qwen.tiktoken` becomes a
    tokenizer.json that loads without remote code). A directory without tokenizer files is refused
    unless allow_no_tokenizer (the weights alone; scripts then cannot tokenise prompts). Fails with
    ConversionError, writing nothing at `out`, on any problem."""
    if dtype not in _NP_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(_NP_DTYPES)}, got {dtype!r}")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf_dir {hf_dir} is not a directory")
    cfg_file = os.path.join(hf_dir, "config.json")
    if not os.path.exists(cfg_file):
        raise ConversionError(f"no config.json in {hf_dir}")
    try:
        with open(cfg_file) as f:
            cfg_dict = json.load(f)
        cfg = config_from_hf_dict(cfg_dict)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file} is not valid JSON: {e}") from e
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    if os.path.exists(out) and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it")
    if not allow_no_tokenizer and not any(os.path.isfile(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES):
        raise ConversionError(f"{hf_dir} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the model's "
                              "tokenizer files there, or pass --allow_no_tokenizer to convert the weights alone")
    _, _, target = abstract_params(cfg, DTYPES[dtype])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(1 for _ in _leaves(target)), desc="converting", unit="tensor")
    # validation (names, shapes) happens before the first parameter is yielded, so a bad directory
    # fails before anything is written; then each parameter is converted, written and dropped
    params = iter_params(hf_dir, cfg, target, _NP_DTYPES[dtype], progress=(lambda _: bar.update(1)) if bar else None)
    sidecar = tempfile.TemporaryDirectory() if cfg.family == "qwen_vl" else None
    try:
        first = next(params)
        stream = _chain_first(first, params)
        side = hf_dir if sidecar is None else _qwen_vl_sidecar(hf_dir, sidecar.name)
        return write_checkpoint(out, cfg_dict, stream, dtype, source=os.path.abspath(hf_dir), sidecar_dir=side,
                                overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()
        if sidecar is not None:
            sidecar.cleanup()


def _qwen_vl_sidecar(hf_dir: str, tmp: str) -> str:
    """The official Qwen-VL directory's tokenizer as transformers files (tokenizer.json, ...) in `tmp`: its
    own tokenizer_config.json names remote code, so it is not copied; generation_config.json is."""
    from jaxflow.data.qwen_vl_tokenizer import is_qwen_vl_tokenizer_dir, load_qwen_vl_tokenizer

    if is_qwen_vl_tokenizer_dir(hf_dir):
        try:
            load_qwen_vl_tokenizer(hf_dir).save_pretrained(tmp)
        except (OSError, ValueError) as e:
            raise ConversionError(f"{hf_dir}: cannot read its Qwen-VL tokenizer: {e}") from e
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        for name in os.listdir(hf_dir):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "added_tokens.json"):
                shutil.copy2(os.path.join(hf_dir, name), tmp)
    gen = os.path.join(hf_dir, "generation_config.json")
    if os.path.isfile(gen):
        shutil.copy2(gen, tmp)
    return tmp


def from_state_dict(config, state_dict, dtype: str = "float32"):
    """A jaxflow model of any supported family from an in-memory transformers model, writing no files:
    `from_state_dict(hf_model.config, hf_model.state_dict(), "bfloat16")`.

    config: a transformers config object or its dict; state_dict: name -> torch tensor (or numpy /
    jax array) in any key layout transformers uses. torch tensors cross through DLPack and stay on
    their device (CUDA tensors become GPU arrays). As strict as `convert_checkpoint`: every parameter
    found, every tensor used, every shape checked, before any weight is copied.
    """
    from flax import nnx

    if dtype not in _NP_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(_NP_DTYPES)}, got {dtype!r}")
    cfg_dict = config if isinstance(config, dict) else config.to_dict()
    try:
        cfg = config_from_hf_dict(cfg_dict)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    graphdef, state, target = abstract_params(cfg, DTYPES[dtype])
    params: dict = {}
    for path, arr in iter_params_in_memory(state_dict, cfg, target, DTYPES[dtype]):
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = arr
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _chain_first(first, rest):
    yield first
    yield from rest


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


__all__ = ["convert_checkpoint", "from_state_dict", "load", "load_tokenizer", "save_model", "canonical_key", "ConversionError",
           "CheckpointError"]
