"""The evaluation runner on the fixture data sets (tiny model): outputs, K = L against the plain model,
resume after an interruption, the cliff-layer definition on hand-made curves, and input errors."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxflow.data.datasets import DatasetError, load_dataset
from jaxflow.data.fixtures import write_fixtures
from jaxflow.evaluation import (CURVE_PNG, PREDICTIONS, EvalConfig, EvaluationError, cliff_figure, cliff_layer,
                                item_score, layout_rows, parse_sweep, plan_batches, read_records, repair_jsonl,
                                resolve_layers, run_evaluation)
from jaxflow.metrics import PRIMARY_METRIC, score
from jaxflow.pipeline import load_bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4  # every run below uses it, so the compiled programs are shared


_TINY = {}  # the tiny random checkpoint (set by the bundle fixture): these are tests of mechanics


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint):
    _TINY["path"] = tiny_checkpoint
    return load_bundle(tiny_checkpoint)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evalfx"))
    return root, write_fixtures(root)


def _cfg(dataset, out, fixtures=None, **kw):
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("progress", False)
    kw.setdefault("checkpoint", _TINY["path"])  # KeyError: the test must request the bundle fixture
    if fixtures is not None:
        kw.setdefault("data_dir", fixtures[1][dataset][0])
        kw.setdefault("image_dir", fixtures[1][dataset][1])
    return EvalConfig(dataset=dataset, out=str(out), **kw)


@pytest.fixture(scope="module")
def sweep_runs(bundle, tmp_path_factory):
    """--sweep all on every fixture set (bundled fixtures: no data_dir)."""
    root = tmp_path_factory.mktemp("runs")
    return {ds: run_evaluation(_cfg(ds, root / ds), bundle=bundle) for ds in ("pope", "textvqa", "scienceqa", "chair")}


def _by_key(path):
    recs = read_records(path)
    out = {(r["id"], r["K"]): r for r in recs}
    assert len(out) == len(recs), "duplicate (id, K) records"
    return out


# --------------------------------------------------------------------------- the runner's outputs


@pytest.mark.parametrize("dataset", ["pope", "textvqa", "scienceqa", "chair"])
def test_runner_writes_summary_csv_and_figure(sweep_runs, dataset):
    res = sweep_runs[dataset]
    s, out = res.summary, res.out
    L = 4
    assert s["layers"] == list(range(L + 1)) and s["num_layers"] == L
    assert s["primary_metric"] == PRIMARY_METRIC[dataset]
    # per-item file: every (item, K) once, with the per-item score of its prediction
    ds = load_dataset(dataset, *write_fixtures(os.path.join(out, "fixtures"))[dataset])
    recs = _by_key(os.path.join(out, PREDICTIONS))
    assert set(recs) == {(it.id, k) for it in ds for k in range(L + 1)}
    for it in ds:
        for k in range(L + 1):
            r = recs[(it.id, k)]
            assert r["score"] == item_score(dataset, r["prediction"], it)
            assert 1 <= r["n_tokens"] <= 128
    # summary.json: metrics per K = metrics.score on the file's predictions; cliff as defined
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk["cliff_layer"] == s["cliff_layer"] == cliff_layer(s["layers"], s["primary"], 0.01)
    for row in on_disk["per_layer"]:
        want = score(dataset, {it.id: recs[(it.id, row["K"])]["prediction"] for it in ds}, ds.items)
        assert row["metrics"] == pytest.approx(want)
    assert on_disk["baseline"] == on_disk["per_layer"][-1]["metrics"][s["primary_metric"]]
    # summary.csv: one row per K, the primary metric second
    rows = list(csv.reader(open(os.path.join(out, "summary.csv"))))
    assert rows[0][:2] == ["K", s["primary_metric"]] and len(rows) == L + 2
    for row, per in zip(rows[1:], on_disk["per_layer"]):
        assert int(row[0]) == per["K"]
        assert dict(zip(rows[0][1:], map(float, row[1:]))) == pytest.approx(per["metrics"])
    with Image.open(os.path.join(out, CURVE_PNG)) as im:
        assert im.format == "PNG" and im.size[0] > 400
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["params"]["dataset"] == dataset and run["params"]["layers"] == list(range(L + 1))


@pytest.mark.parametrize("dataset", ["pope", "chair"])
def test_sweep_k_equals_l_is_the_plain_model(sweep_runs, bundle, tmp_path, dataset):
    """--sweep none (plain generate) gives the K = L predictions and metrics of --sweep all."""
    res = run_evaluation(_cfg(dataset, tmp_path / "none", sweep="none"), bundle=bundle)
    full = sweep_runs[dataset]
    plain = _by_key(res.files["predictions"])
    sweep = _by_key(full.files["predictions"])
    assert {k for _, k in plain} == {4}
    assert plain == {key: r for key, r in sweep.items() if key[1] == 4}
    assert res.summary["per_layer"] == [full.summary["per_layer"][-1]]
    assert res.summary["cliff_layer"] is None and res.summary["baseline"] == full.summary["baseline"]
    assert os.path.exists(res.files["figure"])
    if dataset == "chair":  # the truncated variants really differ from the untruncated one
        assert any(sweep[(i, 0)]["prediction"] != sweep[(i, 4)]["prediction"] for i, _ in plain)


def test_batched_layout_answers_like_one_item_at_a_time(sweep_runs, bundle):
    """The runner's batch layout (aligned image blocks, gaps before the text, filler rows) does not
    change a row's answer: the plain model on each item alone gives the K = L predictions."""
    from jaxflow.pipeline import answer

    out = sweep_runs["pope"].out
    ds = load_dataset("pope", *write_fixtures(os.path.join(out, "fixtures"))["pope"], limit=4)
    recs = _by_key(sweep_runs["pope"].files["predictions"])
    for it in ds:
        got = answer(bundle, [it.image], [it.formatted_question], max_new_tokens=8).texts[0]
        assert got == recs[(it.id, 4)]["prediction"], it.id


def test_layout_rows_keeps_tokens_and_order():
    img = 99
    ids = np.array([[0, 0, 1, 5, img, img, 6, 7, 8],
                    [1, 5, img, img, 6, 7, 8, 9, 10]])
    mask = (ids != 0).astype(np.int32)
    mask[0, :2] = 0
    new_ids, new_mask = layout_rows(ids, mask, img, pad_id=0, rows=3, length_bucket=4)
    assert new_ids.shape == (3, 4 + 8)  # P = 4 (BOS, 5, 2 image tokens), text 5 -> bucket 8
    for r, src in enumerate([0, 1, 0]):
        assert new_ids[r][new_mask[r] > 0].tolist() == ids[src][mask[src] > 0].tolist()
        assert new_ids[r, 3] == img and new_ids[r, 4] != img  # every image block ends at column P
        assert new_mask[r, -1] == 1  # the text ends at the last column
    assert plan_batches([3, 5, 5, 1, 4], 2) == [[1, 2], [4, 0], [3]]


# --------------------------------------------------------------------------- resume


def test_resume_after_interruption_equals_uninterrupted_run(sweep_runs, bundle, tmp_path):
    out = tmp_path / "resumed"
    cfg = _cfg("pope", out)

    class Stop(Exception):
        pass

    def stop_after_first(info):
        if info["batch"] == 0:
            raise Stop

    with pytest.raises(Stop):
        run_evaluation(cfg, bundle=bundle, on_batch=stop_after_first)
    pred = out / PREDICTIONS
    lines = pred.read_bytes().splitlines(keepends=True)
    assert len(lines) == BATCH * 5 and all(line.endswith(b"\n") for line in lines)
    assert not (out / "summary.json").exists()
    # a kill in the middle of writing: the last record is cut in half
    pred.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    calls = []
    res = run_evaluation(cfg, bundle=bundle, on_batch=calls.append)
    assert len(calls) == 3  # the first batch again (one record was lost), then the other two
    assert [c["records_written"] for c in calls] == [1, BATCH * 5, BATCH * 5]
    assert _by_key(str(pred)) == _by_key(sweep_runs["pope"].files["predictions"])
    assert res.summary["per_layer"] == sweep_runs["pope"].summary["per_layer"]
    run = json.load(open(out / "run.json"))
    assert len(run["starts"]) == 2
    # a third run finds everything done: nothing generated, nothing appended
    size = pred.stat().st_size
    again = run_evaluation(_cfg("pope", out, epsilon=0.5, batch_size=2), bundle=bundle)
    assert again.items_run == 0 and pred.stat().st_size == size and again.summary["epsilon"] == 0.5


def test_resume_with_other_parameters_is_refused(sweep_runs, bundle, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(sweep_runs["pope"].out, out)
    for change in (dict(sweep="0,4"), dict(limit=4), dict(max_new_tokens=4), dict(template="llava_hf")):
        with pytest.raises(EvaluationError, match="holds a different run") as e:
            run_evaluation(_cfg("pope", out, **change), bundle=bundle)
        assert "--overwrite" in str(e.value)
    with pytest.raises(EvaluationError, match="holds a different run.*dataset"):
        run_evaluation(_cfg("scienceqa", out), bundle=bundle)
    os.remove(out / "run.json")
    with pytest.raises(EvaluationError, match="run.json does not"):
        run_evaluation(_cfg("pope", out), bundle=bundle)
    res = run_evaluation(_cfg("pope", out, sweep="none", overwrite=True), bundle=bundle)
    assert {r["K"] for r in read_records(res.files["predictions"])} == {4}


def test_repair_jsonl(tmp_path):
    p = tmp_path / "p.jsonl"
    assert repair_jsonl(str(p)) == 0  # no file
    p.write_bytes(b"")
    assert repair_jsonl(str(p)) == 0
    p.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    assert repair_jsonl(str(p)) == 0 and p.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    p.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert repair_jsonl(str(p)) == 6 and p.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    p.write_bytes(b'{"a": 1}')  # complete JSON but no newline: the write was not finished
    assert repair_jsonl(str(p)) == 8 and p.read_bytes() == b""
    p.write_bytes(b'{"id": "x", "K": 0, "prediction": "y", "score": 1.0}\nnot json\n')
    with pytest.raises(EvaluationError, match=r"p.jsonl:2: malformed record"):
        read_records(str(p))


# --------------------------------------------------------------------------- cliff layer


@pytest.mark.parametrize("values, epsilon, want", [
    # 0.84 is within 0.01 of 0.85 (0.85 - 0.84 rounds to 0.010000000000000009: the 1e-9 slack)
    ([0.50, 0.60, 0.84, 0.85, 0.85], 0.01, 2),
    # not monotone: K = 1 is within epsilon but K = 2 is not, so the cliff is 3
    ([0.50, 0.85, 0.70, 0.85, 0.85], 0.01, 3),
    # flat curve: the image never matters, cliff 0
    ([0.85, 0.85, 0.85, 0.85, 0.85], 0.01, 0),
    # truncation helps by more than epsilon (e.g. the paper's POPE gains): that is a change too
    ([0.90, 0.90, 0.87, 0.85, 0.85], 0.01, 3),
    # only the untruncated model is within: the cliff is L
    ([0.2, 0.2, 0.2, 0.2, 0.85], 0.01, 4),
    # epsilon 0 demands equality; a larger epsilon moves the cliff down
    ([0.50, 0.60, 0.84, 0.85, 0.85], 0.0, 3),
    ([0.50, 0.60, 0.84, 0.85, 0.85], 0.4, 0),
    # lower-is-better metrics (CHAIR_s) are treated alike: |difference|
    ([0.60, 0.40, 0.145, 0.138, 0.138], 0.01, 2),
    # a NaN is never within
    ([0.85, float("nan"), 0.85, 0.85, 0.85], 0.01, 2),
])
def test_cliff_layer_worked_examples(values, epsilon, want):
    assert cliff_layer(range(5), values, epsilon) == want


def test_cliff_layer_partial_grid_and_errors():
    # a sweep over K = 0, 8, 16, 24, 32 resolves the cliff to those layers; order does not matter
    assert cliff_layer([32, 0, 16, 8, 24], [0.85, 0.5, 0.7, 0.6, 0.851]) == 24
    assert cliff_layer([32], [0.5]) == 32
    with pytest.raises(ValueError, match="2 layers but 3 values"):
        cliff_layer([0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="epsilon"):
        cliff_layer([0, 1], [1, 2], -0.1)
    with pytest.raises(ValueError, match="largest layer"):
        cliff_layer([0, 1, 2], [1, 2, 3], baseline_layer=1)
    with pytest.raises(ValueError, match="distinct"):
        cliff_layer([0, 0, 1], [1, 2, 3])


def test_cliff_figure_over_runs(sweep_runs, tmp_path):
    root = os.path.dirname(sweep_runs["pope"].out)
    res = cliff_figure([root], str(tmp_path / "fig5.png"))
    assert sorted(d for d, _, _ in res["cliffs"]) == ["chair", "pope", "scienceqa", "textvqa"]
    for ds, model, k in res["cliffs"]:
        assert model == "tiny-random" and k == sweep_runs[ds].summary["cliff_layer"]
    with Image.open(tmp_path / "fig5.png") as im:
        assert im.format == "PNG"
    loose = cliff_figure([sweep_runs["chair"].out], str(tmp_path / "loose.png"), epsilon=1.0)
    assert loose["cliffs"] == [("chair", "tiny-random", 0)]
    with pytest.raises(EvaluationError, match="no summary.json"):
        cliff_figure([str(tmp_path)], str(tmp_path / "x.png"))
    with pytest.raises(EvaluationError, match="not found"):
        cliff_figure([str(tmp_path / "missing")], str(tmp_path / "x.png"))


# --------------------------------------------------------------------------- errors


def test_sweep_parsing():
    assert parse_sweep("all") == "all" and parse_sweep(" None ") == "none"
    assert parse_sweep("8,0,8") == (0, 8) and parse_sweep([3, 1]) == (1, 3)
    assert resolve_layers("0,2", 4) == [0, 2, 4] and resolve_layers("none", 4) is None
    assert resolve_layers("all", 2) == [0, 1, 2]
    for bad in ("", "1,,2", "x", "-1", "1.5", "all,1"):
        with pytest.raises(EvaluationError, match="sweep"):
            parse_sweep(bad)
    with pytest.raises(EvaluationError, match=r"out of range 0\.\.4"):
        resolve_layers("0,9", 4)


def test_bad_inputs_in_the_library(bundle, fixtures, tmp_path):
    with pytest.raises(EvaluationError, match=r"cut layer\(s\) \[9\] out of range 0\.\.4"):
        run_evaluation(_cfg("pope", tmp_path / "a", fixtures, sweep="0,9"), bundle=bundle)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="problems.json"):
        run_evaluation(_cfg("scienceqa", tmp_path / "b", data_dir=str(empty), image_dir=str(empty)), bundle=bundle)
    for kw, msg in [(dict(limit=0), "--limit"), (dict(batch_size=0), "--batch_size"),
                    (dict(epsilon=-1.0), "--epsilon"), (dict(max_new_tokens=0), "--max_new_tokens"),
                    (dict(image_dir=None), "--data_dir needs --image_dir"),
                    (dict(data_dir=None), "--image_dir needs --data_dir"),
                    (dict(options={"ocr": False}), "unknown option")]:
        with pytest.raises(EvaluationError, match=msg):
            run_evaluation(_cfg("pope", tmp_path / "c", fixtures, **kw), bundle=bundle)


def test_unreadable_image_fails_or_is_skipped(bundle, fixtures, tmp_path):
    root = tmp_path / "fx"
    shutil.copytree(fixtures[0], root)
    data_dir, image_dir = (p.replace(fixtures[0], str(root)) for p in fixtures[1]["pope"])
    (root / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"not a jpeg")
    cfg = dict(data_dir=data_dir, image_dir=image_dir, limit=4)  # random/1 and random/2 use image 42
    with pytest.raises(EvaluationError, match=r"item random/1: cannot read its image .*000000000042\.jpg"):
        run_evaluation(_cfg("pope", tmp_path / "strict", **cfg), bundle=bundle)
    res = run_evaluation(_cfg("pope", tmp_path / "lenient", skip_bad=True, **cfg), bundle=bundle)
    assert [i for i, _ in res.skipped] == ["random/1", "random/2"] and res.summary["n_items"] == 2
    assert {r["id"] for r in read_records(res.files["predictions"])} == {"random/3", "random/4"}


def _script(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("args, msg", [
    (["--dataset=pope", "--sweep=1,x"], "--sweep must be all, none or comma-separated cut layers"),
    (["--dataset=pope", "--data_dir=/nonexistent/pope", "--image_dir=/tmp"], "--data_dir not found: /nonexistent"),
    (["--dataset=pope", "--checkpoint=/nonexistent/ckpt"], "--checkpoint directory not found"),
    (["--dataset=coco"], "flag --dataset=coco: value should be one of"),
    ([], "--dataset is required"),
])
def test_script_errors(args, msg, tmp_path):
    res = _script(*args, f"--out={tmp_path / 'out'}")
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], res.stderr[-2000:]


def test_script_end_to_end_offline(tmp_path):
    """`python scripts/evaluate.py --dataset scienceqa` on the bundled fixtures and the embedded toy model."""
    out = tmp_path / "sqa"
    res = _script("--dataset=scienceqa", f"--out={out}", "--progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cliff layer:" in res.stdout and "(baseline, untruncated)" in res.stdout
    for name in ("predictions.jsonl", "summary.json", "summary.csv", CURVE_PNG, "run.json"):
        assert (out / name).exists(), name
    s = json.load(open(out / "summary.json"))
    assert s["n_items"] == 3 and s["layers"] == [0, 1, 2, 3, 4]
    # the same directory with other parameters is refused (before the model is loaded)
    bad = _script("--dataset=scienceqa", f"--out={out}", "--sweep=none")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "holds a different run" in bad.stderr


def _tree_digest(root):
    import hashlib

    h = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_a_refused_run_changes_nothing(bundle, tmp_path):
    """A second run with another seed is refused before it regenerates the toy data, whether the first
    one has finished or is still running (holding the folder's lock), --overwrite or not."""
    from jaxflow.evaluation.records import RunLock

    out = tmp_path / "toy"
    cfg = dict(options={"n": 6}, sweep="none", max_new_tokens=2)
    run_evaluation(_cfg("toy_pope", out, seed=0, **cfg), bundle=bundle)
    before = _tree_digest(out)
    with pytest.raises(EvaluationError, match="seed"):
        run_evaluation(_cfg("toy_pope", out, seed=1, **cfg), bundle=bundle)
    assert _tree_digest(out) == before
    with RunLock(str(out)):  # a run in progress
        with pytest.raises(EvaluationError, match="another evaluation is running"):
            run_evaluation(_cfg("toy_pope", out, seed=1, overwrite=True, **cfg), bundle=bundle)
    assert _tree_digest(out) == before
