"""The converter fails with one clear message and writes nothing at --out on bad input."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

import jaxflow  # noqa: E402
import hf_reference as R  # noqa: E402
from jaxflow.convert import CheckpointError, canonical_key  # noqa: E402


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "hf"
    R.save_hf(R.build_hf_model("mha"), str(d))
    return d


def _copy(good_dir, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(good_dir, d)
    return d


def _edit_tensors(d, fn):
    from safetensors.numpy import load_file, save_file

    f = str(d / "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _assert_fails(d, tmp_path, *phrases):
    out = tmp_path / "ckpt" / "model"
    res = R.convert_cli(str(d), str(out))
    assert res.returncode != 0
    err_lines = [l for l in res.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1, res.stderr[-2000:]
    for p in phrases:
        assert p in err_lines[0], err_lines[0]
    assert not out.exists()
    parent = out.parent
    assert not parent.exists() or os.listdir(parent) == [], "no partial checkpoint may be left"
    return err_lines[0]


def test_missing_key(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    _edit_tensors(d, lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    _assert_fails(d, tmp_path, "missing", "language_model.layers.1.mlp.up_proj.weight")


def test_extra_key(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    _edit_tensors(d, lambda t: t.__setitem__("language_model.model.layers.0.mystery.weight",
                                             np.zeros((2, 2), np.float32)))
    _assert_fails(d, tmp_path, "unused", "language_model.layers.0.mystery.weight")


def test_wrong_shape(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    key = "language_model.model.layers.2.self_attn.k_proj.weight"
    _edit_tensors(d, lambda t: t.__setitem__(key, np.zeros((7, 32), np.float32)))
    _assert_fails(d, tmp_path, "wrong shape", "language_model.layers.2.self_attn.k_proj.weight")


def test_truncated_file(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _assert_fails(d, tmp_path, "model.safetensors", "truncated")


def test_non_llava_config(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_fails(d, tmp_path, "model_type='llama'", "LLaVA")


def test_existing_out_is_not_overwritten(good_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = R.convert_cli(str(good_dir), str(out))
    assert res.returncode != 0 and "--overwrite" in res.stderr
    assert (out / "keep.txt").exists()
    res = R.convert_cli(str(good_dir), str(out), extra=["--overwrite"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (out / "keep.txt").exists()
    jaxflow.load(str(out))
    assert sorted(os.listdir(tmp_path)) == ["exists"], "no temporary directories left behind"


def test_load_rejects_incomplete_checkpoint(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete jaxflow checkpoint"):
        jaxflow.load(str(tmp_path / "half"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        jaxflow.load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("key,want", [
    ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
    ("language_model.model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.vision_tower.embeddings.class_embedding", "vision_tower.embeddings.class_embedding"),
    ("vision_tower.vision_model.embeddings.class_embedding", "vision_tower.embeddings.class_embedding"),
    ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
])
def test_key_layouts(key, want):
    assert canonical_key(key) == want


def test_older_key_layout_converts(good_dir, tmp_path):
    """A file with transformers-4-era names (vision_tower.vision_model.*) converts to the same weights."""
    d = _copy(good_dir, tmp_path)

    def rename(t):
        for k in [k for k in t if k.startswith("vision_tower.")]:
            t["vision_tower.vision_model." + k[len("vision_tower."):]] = t.pop(k)
    _edit_tensors(d, rename)
    res = R.convert_cli(str(d), str(tmp_path / "jf"))
    assert res.returncode == 0, res.stderr[-2000:]
    res = R.convert_cli(str(good_dir), str(tmp_path / "jf2"))
    a, b = jaxflow.load(str(tmp_path / "jf")), jaxflow.load(str(tmp_path / "jf2"))
    np.testing.assert_array_equal(np.asarray(a.vision_tower.layers.mlp.fc1.kernel[...]),
                                  np.asarray(b.vision_tower.layers.mlp.fc1.kernel[...]))
