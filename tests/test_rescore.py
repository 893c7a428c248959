"""Scoring protocols in the runner: a run's summary names its protocol, and rescoring the saved
predictions under another protocol gives the numbers a run under that protocol gives."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pope_runs(tmp_path_factory):
    from jaxflow.evaluation import EvalConfig, run_evaluation

    root = tmp_path_factory.mktemp("rescore")
    runs = {}
    for protocol in ("llava", "lmms"):
        cfg = EvalConfig(dataset="pope", out=str(root / protocol), sweep="0", batch_size=12, max_new_tokens=4,
                         progress=False, protocol=protocol)
        runs[protocol] = run_evaluation(cfg)
    return runs


def test_rescoring_equals_a_run_under_that_protocol(pope_runs):
    from jaxflow.evaluation import rescore_run

    llava, lmms = pope_runs["llava"], pope_runs["lmms"]
    assert llava.summary["protocol"] == "llava" and lmms.summary["protocol"] == "lmms"
    with open(llava.files["summary_json"]) as f:
        before = f.read()
    again = rescore_run(llava.out, "lmms")
    assert again["protocol"] == "lmms"
    assert again["per_layer"] == lmms.summary["per_layer"]
    assert again["primary"] == lmms.summary["primary"] and again["cliff_layer"] == lmms.summary["cliff_layer"]
    # lmms-eval's own yes-ratio (the share of "yes" labels) is reported beside the predictions' one
    assert all("lmms_reported_yes_ratio" in r["metrics"] for r in again["per_layer"])
    assert not any("lmms_reported_yes_ratio" in r["metrics"] for r in llava.summary["per_layer"])
    with open(os.path.join(llava.out, "summary.lmms.json")) as f:
        assert json.load(f)["per_layer"] == again["per_layer"]
    assert os.path.isfile(os.path.join(llava.out, "summary.lmms.csv"))
    with open(llava.files["summary_json"]) as f:
        assert f.read() == before  # the run's own summary is left alone
    # and back: the lmms run rescored under llava is the llava run
    assert rescore_run(lmms.out, "llava")["per_layer"] == llava.summary["per_layer"]


def test_rescore_refuses_what_it_cannot_score(tmp_path, pope_runs):
    from jaxflow.evaluation import EvaluationError, rescore_run

    with pytest.raises(EvaluationError, match="no run.json"):
        rescore_run(str(tmp_path), "lmms")
    with pytest.raises(EvaluationError, match="--protocol must be one of llava, lmms, corrected"):
        rescore_run(pope_runs["llava"].out, "official")


def test_rescore_script(pope_runs):
    out = pope_runs["llava"].out
    res = subprocess.run([sys.executable, "scripts/evaluate.py", "--rescore", f"--out={out}", "--protocol=corrected"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rescored under the corrected protocol" in res.stdout and "scoring protocol: corrected" in res.stdout
    assert os.path.isfile(os.path.join(out, "summary.corrected.json"))
    res = subprocess.run([sys.executable, "scripts/evaluate.py", "--rescore"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: --rescore needs --out, the run folder whose predictions to score"


def test_textvqa_test_split_writes_evalai_submissions(tmp_path):
    """A split without answers is not scored: the run writes the EvalAI upload file per cut layer."""
    from jaxflow.data.fixtures import write_fixtures
    from jaxflow.evaluation import EvalConfig, run_evaluation
    from jaxflow.metrics import normalize_answer

    data_dir, image_dir = write_fixtures(str(tmp_path / "fx"))["textvqa"]
    with open(os.path.join(data_dir, "TextVQA_0.5.1_val.json")) as f:
        root = json.load(f)
    root["dataset_type"] = "test"
    for e in root["data"]:
        e.pop("answers", None)
        e["set_name"] = "test"
    test_file = tmp_path / "TextVQA_0.5.1_test.json"
    test_file.write_text(json.dumps(root))
    res = run_evaluation(EvalConfig(dataset="textvqa", data_dir=str(test_file), image_dir=image_dir,
                                    out=str(tmp_path / "run"), sweep="0", batch_size=8, max_new_tokens=3,
                                    progress=False))
    s = res.summary
    assert s["submission"] == {"0": "submission_K0.json", "4": "submission.json"} and "per_layer" not in s
    preds = {}
    with open(res.files["predictions"]) as f:
        for line in f:
            r = json.loads(line)
            preds[(r["id"], r["K"])] = r["prediction"]
    with open(tmp_path / "run" / "submission.json") as f:
        sub = json.load(f)
    # EvalAI's format: every test question once, its integer id and the normalised answer of K = L
    assert [e["question_id"] for e in sub] == [int(e["question_id"]) for e in root["data"]]
    assert all(e["answer"] == normalize_answer(preds[(str(e["question_id"]), 4)]) for e in sub)
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["submission"]["4"] == "submission.json"
