"""scripts/evaluate.py over several processes (jax.distributed on localhost, CPU) and over a device
mesh (simulated CPU devices): the same per-item records as one process on one device, also after a
process is killed half-way and the run restarted. Every run is a fresh process (XLA_FLAGS and
jax.distributed must be set before jax starts); the embedded toy model on generated toy POPE."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxflow.evaluation import PREDICTIONS, read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "scripts", "evaluate.py")
WORKER = os.path.join(REPO, "tests", "_multihost_worker.py")
# 32 items in 4 batches of 8: two per process of a two-process run; rows split on a mesh's data axis
N = 32
ARGS = ["--dataset=toy_pope", "--toy_n=11", f"--limit={N}", "--sweep=0,2", "--batch_size=8", "--progress=false"]
MESHES = ["data:4,model:2", "data:2,model:4", "data:8,model:1"]
HOST_FILES = ("predictions.host0-of-2.jsonl", "predictions.host1-of-2.jsonl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(extra)
    return env


def _start(cmd: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env())


def _hosts(out, port: int, prefix: list[str] | None = None, extra=()) -> list[list[str]]:
    base = prefix or [sys.executable, EVALUATE]
    return [base + ARGS + [f"--out={out}", "--distributed", f"--coordinator=localhost:{port}", "--num_processes=2",
                           f"--process_id={i}", *extra] for i in range(2)]


def _run_hosts(out, tmp_path, tag: str, timeout: int = 240) -> None:
    """Both processes of a two-process run, to the end; each must exit 0."""
    logs = [open(tmp_path / f"{tag}{i}.log", "w") for i in range(2)]
    procs = [_start(cmd, log) for cmd, log in zip(_hosts(out, _free_port()), logs)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    for i, code in enumerate(codes):
        assert code == 0, (tmp_path / f"{tag}{i}.log").read_text()[-3000:]


def _records(path) -> dict:
    """(id, K) -> record of a predictions file; every pair once."""
    recs = read_records(str(path))
    out = {(r["id"], r["K"]): r for r in recs}
    assert len(out) == len(recs), "duplicate (id, K) records"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process: the run on one device, then with --mesh on 8 simulated CPU devices (one jax
    start for all four runs). {None or mesh: run folder}."""
    root = tmp_path_factory.mktemp("one")
    outs = {None: root / "none", **{m: root / m.replace(":", "").replace(",", "-") for m in MESHES}}
    argv = [ARGS + [f"--out={out}"] + ([f"--mesh={m}"] if m else []) for m, out in outs.items()]
    res = subprocess.run([sys.executable, WORKER, "repeat", json.dumps(argv)], capture_output=True, text=True,
                         cwd=REPO, timeout=300, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert res.returncode == 0, res.stderr[-3000:]
    return outs


@pytest.fixture(scope="module")
def reference(runs):
    """The one-process, one-device run's records and summary."""
    recs = _records(runs[None] / PREDICTIONS)
    assert len(recs) == N * 3
    return recs, json.load(open(runs[None] / "summary.json"))


def _check_merged(out, reference) -> None:
    recs, summary = reference
    assert _records(out / PREDICTIONS) == recs
    for name in HOST_FILES:
        assert not (out / name).exists(), name
    s = json.load(open(out / "summary.json"))
    assert s["per_layer"] == summary["per_layer"] and s["params"] == summary["params"]
    # merged in item order: an item's records together, K ascending
    keys = [(r["id"], r["K"]) for r in read_records(str(out / PREDICTIONS))]
    assert [k for _, k in keys] == [0, 2, 4] * N
    assert all(keys[i][0] == keys[i - i % 3][0] for i in range(len(keys)))


def test_two_processes_give_the_one_process_records(reference, tmp_path):
    out = tmp_path / "two"
    _run_hosts(out, tmp_path, "host")
    _check_merged(out, reference)
    starts = json.load(open(out / "run.json"))["starts"]
    assert len(starts) == 1 and starts[0]["processes"] == 2


def test_a_killed_run_resumes_on_restart(reference, tmp_path):
    out = tmp_path / "killed"
    logs = [open(tmp_path / f"slow{i}.log", "w") for i in range(2)]
    slow = [sys.executable, WORKER, "slow", "2"]
    procs = [_start(cmd, log) for cmd, log in zip(_hosts(out, _free_port(), prefix=slow), logs)]
    part = out / HOST_FILES[1]
    try:
        deadline = time.monotonic() + 180
        while not (part.exists() and part.stat().st_size > 0):  # process 1's first batch is on disk
            assert procs[1].poll() is None and time.monotonic() < deadline, (tmp_path / "slow1.log").read_text()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        procs[0].send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for log in logs:
            log.close()
    assert not (out / PREDICTIONS).exists()
    assert 0 < len(read_records(str(part), complete_only=True)) < N // 2 * 3  # killed half-way: 1 of its 2 batches
    _run_hosts(out, tmp_path, "restart")
    _check_merged(out, reference)
    assert len(json.load(open(out / "run.json"))["starts"]) == 2


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_gives_the_same_predictions(runs, reference, mesh):
    """--mesh on 8 simulated CPU devices against the same run on one device (batches of 8: rows
    split on the data axis where it has 2, 4 or 8 devices; heads, MLP and vocabulary on model)."""
    want, summary = reference
    got = _records(runs[mesh] / PREDICTIONS)
    assert got.keys() == want.keys()
    for key, r in want.items():
        assert got[key]["prediction"] == r["prediction"] and got[key]["n_tokens"] == r["n_tokens"], key
        assert got[key]["score"] == pytest.approx(r["score"], rel=1e-5), key
    assert json.load(open(runs[mesh] / "summary.json"))["params"] == summary["params"]
    start = json.load(open(runs[mesh] / "run.json"))["starts"][-1]
    assert start["mesh"] == mesh and start["sharding"] == "tp"


def test_a_mesh_the_devices_cannot_make_exits_2(tmp_path):
    out = tmp_path / "bad"
    res = subprocess.run([sys.executable, EVALUATE, *ARGS, "--mesh=data:3,model:1", f"--out={out}"],
                         capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and "data:3" in err[0], res.stderr
    assert not out.exists()


def test_merge_predictions_keeps_each_record_once_in_item_order(tmp_path):
    """predictions.jsonl (a one-process start) plus per-host files of two launches with a torn last
    line: merged into one record per (id, K) in the given order, the host files deleted."""
    from jaxflow.evaluation import host_predictions, merge_predictions
    from jaxflow.evaluation.records import format_records

    def rec(i, k):
        return {"id": f"q/{i}", "K": k, "prediction": "Yes", "score": 1.0, "n_tokens": 2}

    order = [(f"q/{i}", k) for i in range(4) for k in (0, 4)]
    (tmp_path / PREDICTIONS).write_text(format_records([rec(3, 0), rec(3, 4)]))
    open(host_predictions(str(tmp_path), 0, 2), "w").write(format_records([rec(0, 0), rec(0, 4), rec(3, 0)]))
    open(host_predictions(str(tmp_path), 1, 2), "w").write(format_records([rec(1, 4), rec(1, 0)]) + '{"id": "q/2", "K')
    open(host_predictions(str(tmp_path), 1, 3), "w").write(format_records([rec(2, 0), rec(2, 4)]))
    assert merge_predictions(str(tmp_path), order) == 8
    assert [(r["id"], r["K"]) for r in read_records(str(tmp_path / PREDICTIONS))] == order
    assert sorted(os.listdir(tmp_path)) == [PREDICTIONS]
    assert merge_predictions(str(tmp_path), order) == 0  # nothing to merge
    open(host_predictions(str(tmp_path), 0, 2), "w").write(format_records([rec(9, 0)]))
    with pytest.raises(ValueError, match="other items or layers"):
        merge_predictions(str(tmp_path), order)
