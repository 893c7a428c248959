"""scripts/analyze.py end to end on the embedded default: every figure and file, with sane arrays behind them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxflow.outputs import MANIFEST  # noqa: E402
from PIL import Image

from jaxflow import tiny
from jaxflow.viz.report import AnalyzeError, run_analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, G = 4, 8  # the embedded toy model: 4 decoder layers, 8x8 image grid


def _run(*args):
    # XLA's backend optimisation level 0 compiles ~3x faster on a 2-core runner (what this end-to-end run
    # spends most of its time on); the script's numbers agree with the default level to ~1e-6
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "analyze.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env=env)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    out = root / "out"
    res = _run(f"--out={out}", "--max_new_tokens=3", "--methods=paper,gradcam,gradxact")
    assert res.returncode == 0, res.stderr[-3000:]
    return root, out, res


def _png_ok(path, min_side=300):
    assert path.stat().st_size > 5000, path
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.size)
        px = np.asarray(im.convert("RGB"), np.float32)
    assert px.std() > 10, f"{path} looks blank"  # not a single flat colour


def test_writes_every_figure_and_file(default_run):
    root, out, res = default_run
    s = json.loads((out / "summary.json").read_text())
    figures = ["cam_paper.png", "cam_gradcam.png", "cam_gradxact.png", "cam_paper_tokens.png",
               "cam_gradcam_tokens.png", "cam_gradxact_tokens.png", "attention_shares.png",
               f"attention_layer{s['heatmap_layer']}.png", "image_attention.png", "flows.png"]
    for name in figures:
        _png_ok(out / name)
    _png_ok(out / "model_input.png", min_side=112)
    assert sorted(f for f in os.listdir(out) if f != MANIFEST) == s["files"] == sorted(figures + ["model_input.png", "arrays.npz",
                                                                       "report.html", "summary.json"])
    assert [p for p in os.listdir(root) if p != "out"] == []  # no temporary folder left behind
    # progress lines and the closing summary
    assert "LLaVA-CAM" in res.stdout and "information-flow" in res.stdout and "wrote 14 files" in res.stdout


def test_arrays_have_expected_shapes_and_ranges(default_run):
    _, out, _ = default_run
    s = json.loads((out / "summary.json").read_text())
    a = dict(np.load(out / "arrays.npz"))
    n_ans = len(s["answer_ids"])
    assert 1 <= n_ans <= 3 and s["answer_given"] is False and s["model"] == "toy-llava"
    assert s["num_layers"] == L and s["grid"] == [G, G]
    # the answer is teacher-forced at the end of the sequence
    np.testing.assert_array_equal(a["input_ids"][a["answer_mask"]], s["answer_ids"])
    for m in ("paper", "gradcam", "gradxact"):
        cam = a[f"cam_{m}"]
        assert cam.shape == (L, G, G) and cam.dtype == np.float32
        assert cam.min() >= 0 and cam.max() <= 1 + 1e-6
        assert np.isclose(cam[:-1].max(), 1.0)  # normalised per layer
        np.testing.assert_array_equal(cam[-1], 0.0)  # last layer: image tokens cannot reach the answer
        assert (a[f"cam_{m}_raw"] >= 0).all() and a[f"cam_{m}_raw"].shape == (L, G, G)
        tok = a[f"cam_{m}_tokens"]
        assert tok.shape == (n_ans, L, G, G) and tok.min() >= 0 and tok.max() <= 1 + 1e-6
        assert len(s["cam_peak"][m]) == L
    sh = a["attention_shares"]
    assert sh.shape == (L, 3) and (sh >= 0).all()
    np.testing.assert_allclose(sh.sum(-1), 1.0, atol=1e-5)
    q = a["attention_query_positions"]
    assert q.shape == (n_ans,)  # the answer-predicting positions p - 1
    np.testing.assert_array_equal(q, np.flatnonzero(a["answer_mask"]) - 1)
    assert a["attention_rows"].shape == (L, n_ans, a["input_ids"].shape[0])
    np.testing.assert_allclose(a["attention_rows"].sum(-1), 1.0, atol=1e-5)  # softmax rows
    np.testing.assert_allclose(a["attention_query_shares"].sum(-1), 1.0, atol=1e-5)
    img = a["image_attention"]
    assert img.shape == (L, G, G) and (img > 0).all() and (img < 1).all()
    for k in ("S_to_A", "T_to_A", "U_to_A", "A_to_A", "S_to_U", "T_to_U", "U_to_U"):
        f = a["flow_" + k]
        assert f.shape == (L,) and (f >= 0).all() and np.isfinite(f).all()
    assert a["flow_T_to_A"].max() > 0
    assert a["saliency"].shape[0] == L and (a["saliency"] >= 0).all()
    assert s["flows"]["T->A"] == pytest.approx(a["flow_T_to_A"].tolist(), rel=1e-6)
    assert s["attention_shares"]["T"] == pytest.approx(sh[:, 1].tolist(), rel=1e-6)


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    res = _run("--image=/nonexistent.png", f"--out={tmp_path}/o")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "image not found" in lines[-1]
    assert not (tmp_path / "o").exists()
    # the library function behind the script: the same errors, before any heavy work
    (tmp_path / "notackpt").mkdir()
    cases = [
        (dict(question="  "), "question is empty"),
        (dict(image=str(tmp_path / "missing.png")), "image not found"),
        (dict(checkpoint=str(tmp_path / "nockpt")), "checkpoint not found"),
        (dict(checkpoint=str(tmp_path / "notackpt")), "not a complete jaxflow checkpoint"),
        (dict(answer="   "), "tokenises to no tokens"),
        (dict(methods=("paper", "bogus")), "unknown CAM method"),
    ]
    for override, phrase in cases:
        kw = dict(checkpoint=None, image=tiny.DEMO_IMAGE, question="What is this?", out=str(tmp_path / "o"),
                  progress=None)
        kw.update(override)
        with pytest.raises(AnalyzeError, match=phrase) as e:
            run_analysis(**kw)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and sorted(os.listdir(tmp_path)) == ["notackpt"]
