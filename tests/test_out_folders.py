"""Every script that writes a folder of results keeps what it did not write: a folder holding a
user's file is refused (one line, non-zero exit, nothing written), `--overwrite` writes beside the
file, and a second run replaces the first run's outputs without leaving stale ones."""
import json
import os
import subprocess
import sys

import pytest

from jaxflow.outputs import MANIFEST

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {  # fast settings on the embedded toy model
    "demo": ["--noanalyses", "--max_new_tokens=2"],
    "analyze": ["--methods=paper", "--max_new_tokens=2"],
    "truncation_sweep": ["--layers=0,4", "--max_new_tokens=2"],
    "faithfulness": ["--n=2", "--batch_size=2", "--methods=paper"],
}


def _run(script, out, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", f"{script}.py"), f"--out={out}",
                           *SCRIPTS[script], *extra], capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_users_file_survives(script, tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = _run(script, out)
    err = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert res.returncode != 0 and len(err) == 1 and "did not write" in err[0] and "--overwrite" in err[0], res.stderr
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["work"]  # no staging folder left behind
    res = _run(script, out, "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine"
    ours = json.load(open(out / MANIFEST))["entries"]
    assert ours and "notes.txt" not in ours and set(os.listdir(out)) == set(ours) | {"notes.txt", MANIFEST}


def test_a_second_run_leaves_no_stale_outputs(tmp_path):
    out = tmp_path / "cam"
    assert _run("analyze", out, "--methods=paper,gradcam").returncode == 0
    assert any("gradcam" in f for f in os.listdir(out))
    res = _run("analyze", out)  # paper only: the folder holds only jaxflow's outputs, so no --overwrite needed
    assert res.returncode == 0, res.stderr[-2000:]
    assert not any("gradcam" in f for f in os.listdir(out))


def test_out_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    res = _run("truncation_sweep", f)
    assert res.returncode != 0 and "exists and is not a folder" in res.stderr and f.read_text() == "x"
