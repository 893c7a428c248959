"""Shared fixtures: tiny random transformers LLaVA models and their jaxflow conversions, built once."""
import os

import pytest


@pytest.fixture(scope="session")
def converted_pair(tmp_path_factory):
    """converted_pair(case) -> (torch model, jaxflow model) with identical weights, cached per case.

    The "gqa" case is saved sharded; every case is converted with the CLI."""
    import jaxflow
    import hf_reference as R

    cache = {}

    def get(case):
        if case not in cache:
            tmp = tmp_path_factory.mktemp(case)
            hf = R.build_hf_model(case)
            R.save_hf(hf, str(tmp / "hf"), max_shard_size="40KB" if case == "gqa" else None)
            if case == "gqa":
                assert os.path.exists(tmp / "hf" / "model.safetensors.index.json"), "sharded save expected"
            res = R.convert_cli(str(tmp / "hf"), str(tmp / "jf"))
            assert res.returncode == 0, res.stderr[-3000:]
            cache[case] = (hf, jaxflow.load(str(tmp / "jf")))
        return cache[case]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny random model (jaxflow.tiny) as a checkpoint directory named "tiny-random": tests of
    pipeline mechanics use it, whose answers vary with the image and the cut layer."""
    from jaxflow.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-random"))


@pytest.fixture(scope="session")
def tiny_internvl_checkpoint(tmp_path_factory):
    """A tiny random InternVL (jaxflow.tiny) as a checkpoint directory: the second family's pipelines."""
    from jaxflow.tiny import save_tiny_internvl_checkpoint

    return save_tiny_internvl_checkpoint(str(tmp_path_factory.mktemp("ckpt-internvl") / "tiny-internvl"))


@pytest.fixture(scope="session")
def tiny_qwen2_vl_checkpoints(tmp_path_factory):
    """Tiny random Qwen2-VL and Qwen2.5-VL (jaxflow.tiny) as checkpoint directories: version -> path."""
    from jaxflow.tiny import save_tiny_qwen2_vl_checkpoint

    root = tmp_path_factory.mktemp("ckpt-qwen2-vl")
    return {v: save_tiny_qwen2_vl_checkpoint(str(root / v), v) for v in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="session")
def tiny_qwen_vl_checkpoint(tmp_path_factory):
    """A tiny random Qwen-VL (v1) (jaxflow.tiny) as a checkpoint directory: that family's pipelines."""
    from jaxflow.tiny import save_tiny_qwen_vl_checkpoint

    return save_tiny_qwen_vl_checkpoint(str(tmp_path_factory.mktemp("ckpt-qwen-vl") / "tiny-qwen-vl"))
