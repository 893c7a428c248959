"""Sharding: the rules table, meshes, and every entry point on meshes (8, 1), (4, 2) and (2, 4) of
simulated CPU devices against one device (a fresh process: tests/mesh_check.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxflow import sharding as S

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class FakeMesh:
    shape = {"data": 2, "model": 4}


def test_partition_spec_follows_the_rules_and_drops_what_does_not_divide():
    mesh = FakeMesh()
    P = S.P
    assert S.partition_spec(("layers", "embed", "mlp"), (3, 64, 128), mesh, "tp") == P(None, None, "model")
    assert S.partition_spec(("layers", "embed", "mlp"), (3, 64, 128), mesh, "fsdp") == P(None, "data", "model")
    assert S.partition_spec(("vocab", "embed"), (130, 64), mesh, "tp") == P(None, None)  # 130 % 4 != 0
    assert S.partition_spec(("heads", "embed"), (64, 63), mesh, "fsdp") == P("model", None)  # 63 % 2 != 0
    assert S.partition_spec((None, None), (8, 8), mesh, "fsdp") == P(None, None)


def test_every_decoder_parameter_carries_logical_axes():
    """The stacked decoder weights name (layers, in, out); norms and vision tokens' tables may stay unnamed."""
    from flax import nnx

    from jaxflow.pipeline import load_bundle

    model = load_bundle(None).model
    lm = model.language_model
    names = lambda v, nd: S._names(v, nd)  # noqa: E731
    assert names(lm.layers.self_attn.q_proj.kernel, 3) == ("layers", "embed", "heads")
    assert names(lm.layers.self_attn.k_proj.kernel, 3) == ("layers", "embed", "kv_heads")
    assert names(lm.layers.self_attn.o_proj.kernel, 3) == ("layers", "heads", "embed")
    assert names(lm.layers.mlp.down_proj.kernel, 3) == ("layers", "mlp", "embed")
    assert names(lm.embed_tokens, 2) == ("vocab", "embed")
    state = nnx.state(model, nnx.Param)
    named = [v for v in jax_leaves(state) if v.get_metadata().get("logical_axes")]
    assert len(named) >= 0.5 * len(jax_leaves(state))


def jax_leaves(state):
    import jax
    from flax import nnx

    return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def test_mesh_requests_are_checked_in_one_line():
    assert S.parse_mesh("data:2,model:4") == {"data": 2, "model": 4}
    assert S.parse_mesh("model:2") == {"data": 1, "model": 2}
    for bad in ("data:0", "data:2,data:2", "rows:2", "data2", "data:x"):
        with pytest.raises(S.MeshError, match="--mesh must look like data:N,model:M"):
            S.parse_mesh(bad)
    with pytest.raises(S.MeshError, match=r"needs 6 devices, but 1 are available .*: make data x model = 1"):
        S.make_mesh("data:2,model:3")
    with pytest.raises(S.MeshError, match="sharding rules must be one of tp, fsdp"):
        S.check_rules("zero3")


def test_a_script_refuses_a_bad_mesh(tmp_path):
    res = subprocess.run([sys.executable, "scripts/knockout.py", f"--out={tmp_path / 'ko'}", "--mesh=data:3"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: mesh data:3,model:1 needs 3 devices")
    assert not (tmp_path / "ko").exists()


def _mesh_check(*args) -> dict:
    # optimisation level 0: ~40 small programs compile 3x faster in this short-lived process
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    res = subprocess.run([sys.executable, os.path.join(HERE, "mesh_check.py"), *args], capture_output=True,
                         text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mesh_report():
    return _mesh_check()


def test_every_family_on_a_mesh_equals_one_device():
    """InternVL, Qwen2-VL, Qwen2.5-VL and Qwen-VL (tiny checkpoints, demo image, two prompts) on a 2x4
    mesh: forward, the truncation sweep and CAM as on one device (measured <= 4e-7 on logits of
    magnitude 0.6-0.95), decoder and vision weights split on the model axis."""
    report = _mesh_check("--families")
    assert set(report) == {"internvl", "qwen2_vl", "qwen2_5_vl", "qwen_vl"}
    for family, r in report.items():
        assert r["params"]["on_model"] >= 15, family
        for name, d in r["diff"].items():
            assert d <= 1e-5 * max(1.0, r["scale"][name]), (family, name, d)
        assert r["scale"]["forward"] > 0.1 and r["scale"]["truncation_sweep"] > 0.1, family


def test_every_entry_point_equals_one_device_on_every_mesh(mesh_report):
    """forward, generate, the truncation sweep and truncated generation, CAM, attention shares, saliency,
    knockout (and its sweep) and the logit lens: float results within 1e-5 of one device (relative to
    the result's largest value when that exceeds 1: measured at most 8e-6 absolute on logits of
    magnitude 5, from the reordered sums of the split matmuls), token results identical."""
    assert mesh_report["devices"] == 8
    assert set(mesh_report["meshes"]) == {"8x1", "4x2", "2x4", "2x4:fsdp"}
    for mesh, r in mesh_report["meshes"].items():
        assert len(r["diff"]) == 10
        for name, d in r["diff"].items():
            if name in ("generate", "truncation_generate"):
                assert d == 0, (mesh, name)
            else:
                assert d <= 1e-5 * max(1.0, r["scale"][name]), (mesh, name, d)
                assert r["scale"][name] > 0, (mesh, name)


def test_parameters_really_lie_on_the_mesh(mesh_report):
    m = mesh_report["meshes"]
    assert m["8x1"]["params"]["on_model"] == 0
    for mesh in ("4x2", "2x4"):
        p = m[mesh]["params"]
        assert p["on_model"] >= 20 and p["elements_on_model"] > 0.8 * p["elements"] and p["on_data"] == 0
    assert m["2x4:fsdp"]["params"]["on_data"] >= 10
    assert m["4x2"]["logits_sharding"].startswith("PartitionSpec('data'") or \
        m["4x2"]["logits_sharding"].startswith("P('data'")  # rows on "data"


def test_a_script_on_a_mesh_answers_as_on_one_device(tmp_path):
    """truncation_sweep.py --mesh=data:2,model:4 on 8 simulated devices writes the same answers.json
    (answers, probabilities within 1e-5) as a run on one device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outs = {}
    for name, extra, flags in (("one", {}, []),
                               ("mesh", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                                ["--mesh=data:2,model:4"])):
        out = tmp_path / name
        res = subprocess.run([sys.executable, "scripts/truncation_sweep.py", f"--out={out}", *flags], cwd=REPO,
                             capture_output=True, text=True, env=dict(env, **extra), timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[name] = json.loads((out / "answers.json").read_text())

    def same(a, b, path="answers.json"):
        if isinstance(a, dict):
            assert sorted(a) == sorted(b), path
            for k in a:
                same(a[k], b[k], f"{path}/{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}[{i}]")
        elif isinstance(a, float):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (path, a, b)
        else:
            assert a == b, path

    same(outs["one"], outs["mesh"])
