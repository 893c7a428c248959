"""jaxflow checkpoints: an orbax parameter tree plus the transformers config and tokenizer files.

Layout of `checkpoints/NAME/`:
    config.json                 the transformers LLaVA config (the model is rebuilt from it)
    jaxflow.json                format marker, written last: a directory without it is not a checkpoint
    params/<dotted.path>/       one orbax item per parameter (e.g. params/language_model.layers.mlp.up_proj.kernel),
                                written and restored one at a time so host memory stays near 1x the weights
    tokenizer*, special_tokens_map.json, preprocessor_config.json, ...   copied from the source
Writes are atomic: everything goes to a temporary sibling directory that is renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow.models.config import ConfigError, load_config
from jaxflow.models.family import VisionLanguageModel, build_model

FORMAT = "jaxflow-llava"
FORMAT_VERSION = 2
MARKER = "jaxflow.json"
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "preprocessor_config.json", "processor_config.json",
    "chat_template.json", "chat_template.jinja", "generation_config.json",
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A path that is not a readable jaxflow checkpoint."""


def abstract_params(cfg, dtype) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """(graphdef, abstract state, pure dict of ShapeDtypeStruct) of cfg's model, allocating nothing."""
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    return graphdef, state, nnx.to_pure_dict(state)


def model_params(model: VisionLanguageModel) -> dict:
    """The model's parameters as a pure nested dict of arrays (the checkpoint tree)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _leaves(tree: dict, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def checksum(arr) -> str:
    """CRC-32 of an array's bytes (C order), as 8 hex digits: written at conversion, checked at load."""
    a = np.ascontiguousarray(np.asarray(arr))
    return f"{zlib.crc32(a.reshape(-1).view(np.uint8)) & 0xFFFFFFFF:08x}"


def _write_params(path: str, params) -> dict[str, str]:
    """params: a nested dict, or an iterable of (path tuple, array) consumed one at a time. Returns
    the checksum of every parameter by its dotted name."""
    import orbax.checkpoint as ocp

    items = _leaves(params) if isinstance(params, dict) else params
    os.makedirs(path)
    sums = {}
    with ocp.StandardCheckpointer() as ckptr:
        for leaf_path, arr in items:
            name = ".".join(map(str, leaf_path))
            sums[name] = checksum(arr)
            ckptr.save(os.path.join(os.path.abspath(path), name), {"value": arr})
            ckptr.wait_until_finished()
            del arr
    return sums


def write_checkpoint(out: str, cfg_dict: dict, params: dict, dtype_name: str, *, source: str = "",
                     sidecar_dir: str | None = None, overwrite: bool = False, extra_files: dict | None = None) -> str:
    """Writes a checkpoint atomically at `out`. `params`: the pure dict tree (numpy or jax arrays), or
    an iterable of (path tuple, array) pairs written and dropped one at a time (streaming)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=2)
        if sidecar_dir:
            for name in SIDECAR_FILES:
                src = os.path.join(sidecar_dir, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        sums = _write_params(os.path.join(tmp, "params"), params)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype_name, "source": source,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "checksums": sums}, f, indent=2)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_model(model: VisionLanguageModel, out: str, *, overwrite: bool = False, sidecar_dir: str | None = None,
               extra_files: dict | None = None) -> str:
    """Saves an in-memory model (e.g. a trained or random one) as a jaxflow checkpoint."""
    params = jax.tree.map(np.asarray, model_params(model))
    dtype_name = str(np.dtype(model.dtype))
    return write_checkpoint(out, model.config.to_hf_dict(), params, dtype_name, source="jaxflow",
                            sidecar_dir=sidecar_dir, overwrite=overwrite, extra_files=extra_files)


def read_marker(path: str) -> dict:
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path} (convert one with scripts/convert_checkpoint.py)")
    if not os.path.exists(marker):
        raise CheckpointError(f"{path} is not a complete jaxflow checkpoint (no {MARKER}); "
                              "re-run scripts/convert_checkpoint.py")
    try:
        with open(marker) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker} is corrupt: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {meta.get('format')} v{meta.get('version')}; "
                              f"this jaxflow reads {FORMAT} v{FORMAT_VERSION}")
    return meta


def load(path: str, dtype: str | None = None, *, verify: bool = True, mesh=None,
         rules: str | dict = "tp") -> VisionLanguageModel:
    """Restores a model written by scripts/convert_checkpoint.py (or `save_model`), of any family
    (`model.family` names it).

    dtype: None keeps the stored dtype; "float32"/"bfloat16"/"float16" casts after loading.
    verify: check every parameter against the checksum written at conversion (a corrupt or
    bit-flipped file) and for NaN / Inf values (a broken model); CheckpointError names the first bad
    parameter. Costs about a second per GB of weights on the host.
    mesh: a `jax.sharding.Mesh` with axes ("data", "model"): each parameter is restored straight into
    the layout `jaxflow.sharding` gives it under `rules` ("tp" or "fsdp"), and the model records the
    mesh. With devices of other hosts in the mesh, only the local shards are checked for NaN / Inf.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta = read_marker(path)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    stored = DTYPES.get(meta.get("dtype", "float32"), jnp.float32)
    graphdef, state, target = abstract_params(cfg, stored)
    if mesh is not None:
        from jaxflow.sharding import state_shardings

        shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
        target = jax.tree.map(lambda spec, sh: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sh),
                              target, shardings)
    want = DTYPES[dtype] if dtype is not None else None
    sums = meta.get("checksums") or {} if verify else {}
    restored: dict = {}
    with ocp.StandardCheckpointer() as ckptr:
        for leaf_path, spec in _leaves(target):  # one parameter at a time: host memory ~ 1x the weights
            item = os.path.join(path, "params", ".".join(map(str, leaf_path)))
            try:
                stored_shape = tuple(ckptr.metadata(item).item_metadata.tree["value"].shape)
            except Exception:  # noqa: BLE001 - metadata layouts differ between orbax versions: restore decides
                stored_shape = tuple(spec.shape)
            if stored_shape != tuple(spec.shape):
                raise CheckpointError(f"{path}: parameter {'.'.join(map(str, leaf_path))} is stored as "
                                      f"{stored_shape} but config.json implies {tuple(spec.shape)} (a config.json "
                                      "whose sizes disagree with the arrays): restore the checkpoint's own config.json")
            try:
                arr = ckptr.restore(item, {"value": spec})["value"]
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                first = " ".join(str(e).split())[:300]
                raise CheckpointError(f"cannot restore parameter {'.'.join(map(str, leaf_path))} of {path} (corrupt "
                                      f"file, or a config.json whose sizes disagree with it?): {first}") from e
            name = ".".join(map(str, leaf_path))
            if verify and not getattr(arr, "is_fully_addressable", True):  # other hosts hold the rest
                for shard in arr.addressable_shards:
                    if jnp.issubdtype(arr.dtype, jnp.floating) and not np.isfinite(np.asarray(shard.data)).all():
                        raise CheckpointError(f"{path}: parameter {'.'.join(map(str, leaf_path))} holds NaN or Inf "
                                              "values: the model is broken (re-convert it from a good source)")
            elif verify:  # on the host copy the checksum reads anyway: no device program to compile per shape
                host = np.asarray(arr)
                if name in sums and checksum(host) != sums[name]:
                    raise CheckpointError(f"{path}: parameter {name} does not match the checksum written at "
                                          "conversion (the file is corrupt): convert the checkpoint again")
                if jnp.issubdtype(host.dtype, jnp.floating) and not np.isfinite(host).all():
                    raise CheckpointError(f"{path}: parameter {name} holds NaN or Inf values: the model is broken "
                                          "(re-convert it from a good source)")
                del host
            node = restored
            for k in leaf_path[:-1]:
                node = node.setdefault(k, {})
            node[leaf_path[-1]] = jnp.asarray(arr, want) if want is not None else jnp.asarray(arr)
            del arr
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        from jaxflow.sharding import set_mesh

        set_mesh(model, mesh)
    return model


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer: transformers AutoTokenizer from the local directory, or for an
    official Qwen-VL directory (qwen.tiktoken, no tokenizer.json) the same tokenizer built without its
    remote code (`jaxflow.data.qwen_vl_tokenizer`)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from jaxflow.data.qwen_vl_tokenizer import is_qwen_vl_tokenizer_dir, load_qwen_vl_tokenizer

    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if is_qwen_vl_tokenizer_dir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            return load_qwen_vl_tokenizer(path)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a config.json of a non-transformers model type (Qwen-VL) warns
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
    except Exception as e:  # noqa: BLE001
        bad = corrupt_json(path)
        if bad:
            raise CheckpointError(bad) from e
        raise CheckpointError(f"{path} holds no loadable tokenizer: {str(e).splitlines()[0] if str(e) else e!r}") from e


def corrupt_json(folder: str) -> str | None:
    """One line naming the first *.json file of `folder` that does not parse (None if every one does):
    what a loader's own error leaves out."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    except OSError:
        return None
    for name in names:
        f = os.path.join(folder, name)
        try:
            with open(f, encoding="utf-8") as fh:
                json.load(fh)
        except (ValueError, UnicodeDecodeError) as e:
            return f"{f} is not valid JSON ({e}): restore that file from the original checkpoint"
        except OSError:
            continue
    return None
