"""Broken models are detected at load, with one line naming the parameter: a NaN weight, an Inf
weight in the vision tower, a corrupt parameter file (checksum), and a config.json whose sizes
disagree with the stored arrays; `scripts/demo.py` on such a checkpoint exits non-zero with one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxflow
from jaxflow.convert import CheckpointError
from jaxflow.convert.checkpoint import MARKER, model_params, save_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _poisoned(tmp_path, name, where, value):
    from flax import nnx

    from jaxflow.tiny import tiny_model

    model = tiny_model()
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    node = params
    for k in where[:-1]:
        node = node[k]
    arr = np.array(node[where[-1]])
    arr.reshape(-1)[arr.size // 2] = value
    node[where[-1]] = arr
    path = str(tmp_path / name)
    shutil.rmtree(path, ignore_errors=True)
    from jaxflow.convert.checkpoint import write_checkpoint

    write_checkpoint(path, model.config.to_hf_dict(), params, "float32", source="test")
    return path


@pytest.mark.parametrize("where,value,name", [
    (("language_model", "layers", "mlp", "up_proj", "kernel"), np.nan, "language_model.layers.mlp.up_proj.kernel"),
    (("vision_tower", "patch_embedding"), np.inf, "vision_tower.patch_embedding"),
])
def test_non_finite_weights_are_named(tmp_path, where, value, name):
    path = _poisoned(tmp_path, "bad", where, value)
    with pytest.raises(CheckpointError, match=f"parameter {name} holds NaN or Inf"):
        jaxflow.load(path)
    jaxflow.load(path, verify=False)  # the check can be turned off
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), f"--checkpoint={path}",
                          "--noanalyses", f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    err = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert res.returncode != 0 and len(err) == 1 and name in err[0], res.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_changed_parameter_file_fails_its_checksum(tiny_checkpoint, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint, path)
    meta = json.load(open(os.path.join(path, MARKER)))
    assert len(meta["checksums"]) == len(jax_leaves(jaxflow.load(path)))
    name = "language_model.norm.scale"
    meta["checksums"][name] = "00000000"  # what a flipped bit in that parameter's file amounts to
    json.dump(meta, open(os.path.join(path, MARKER), "w"))
    with pytest.raises(CheckpointError, match=f"parameter {name} does not match the checksum"):
        jaxflow.load(path)


def test_flipped_bytes_in_a_file_are_one_line(tiny_checkpoint, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint, path)
    item = os.path.join(path, "params", "language_model.layers.mlp.up_proj.kernel")
    data = max((os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs), key=os.path.getsize)
    raw = bytearray(open(data, "rb").read())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0xFF
    open(data, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match="language_model.layers.mlp.up_proj.kernel"):
        jaxflow.load(path)


def test_config_sizes_that_disagree_with_the_arrays(tiny_checkpoint, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint, path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["text_config"]["intermediate_size"] += 8
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="config.json whose sizes disagree"):
        jaxflow.load(path)


def jax_leaves(model):
    import jax

    return jax.tree.leaves(model_params(model))


def test_save_model_writes_checksums(tmp_path):
    from jaxflow.tiny import tiny_model

    path = save_model(tiny_model(), str(tmp_path / "m"))
    assert all(len(v) == 8 for v in json.load(open(os.path.join(path, MARKER)))["checksums"].values())


# --------------------------------------------------------------------------- non-finite outputs at run time


def _with_value(where, layer, value):
    """The tiny model with one entry of a stacked parameter (`where`, at `layer`) set to `value`
    (a model in memory: what verify at load cannot see, e.g. a float16 overflow)."""
    from flax import nnx

    from jaxflow.tiny import tiny_config
    from jaxflow.models.llava import Llava

    model = Llava(tiny_config(), rngs=nnx.Rngs(0))
    node = model
    for k in where:
        node = getattr(node, k)
    arr = np.array(node[...])
    if layer is None:
        arr.reshape(-1)[0] = value
    else:
        arr[layer].reshape(-1)[0] = value
    node[...] = arr
    return model


@pytest.mark.parametrize("where,layer,expect", [
    (("language_model", "layers", "mlp", "down_proj", "kernel"), 2, "decoder layer 2 of 4"),
    (("vision_tower", "layers", "mlp", "fc1", "kernel"), 0, "the image features"),
])
def test_non_finite_outputs_name_the_first_stage(where, layer, expect):
    from jaxflow import tiny
    from jaxflow.health import NonFiniteError
    from jaxflow.pipeline import Bundle, encode

    model = _with_value(where, layer, np.inf)
    bundle = Bundle(model, tiny.tiny_tokenizer(), __import__("jaxflow.data.image", fromlist=["ImageSpec"]).ImageSpec
                    .for_size(tiny.TINY_IMAGE_SIZE), "broken", template="vicuna_v1")
    batch, pix = encode(bundle, [tiny.DEMO_IMAGE], [tiny.DEMO_QUESTION])
    with pytest.raises(NonFiniteError) as e:
        jaxflow.generate(model, batch.input_ids, pix, batch.attention_mask, max_new_tokens=2)
    msg = str(e.value)
    assert "\n" not in msg and "NaN/Inf" in msg and expect in msg, msg
    if layer == 0:
        with pytest.raises(NonFiniteError, match=expect):
            jaxflow.truncation_sweep(model, batch.input_ids, pix, batch.attention_mask)
    from jaxflow.health import first_non_finite

    if layer == 2:  # a later stage: the unembedding alone
        ok = _with_value(("language_model", "lm_head"), None, np.inf)
        assert "final norm and unembedding" in first_non_finite(ok, batch.input_ids, pix, batch.attention_mask)
        assert first_non_finite(tiny.tiny_model(), batch.input_ids, pix, batch.attention_mask) is None
    # the check can be turned off: the numbers come back as they are
    out = jaxflow.generate(model, batch.input_ids, pix, batch.attention_mask, max_new_tokens=2, check_finite=False)
    assert out.tokens.shape == (1, 2)
