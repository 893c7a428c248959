"""The run directory's files: per-item predictions (JSON lines, appended per batch, crash-safe),
the run's parameters (run.json) and the lock that keeps two runners out of one directory.

``predictions.jsonl`` holds one JSON object per line::

    {"id": "random/1", "K": 32, "prediction": "Yes", "score": 1.0, "n_tokens": 2}

A batch's lines are written with one ``write`` call, then flushed and fsynced, so after a kill the
file holds whole batches plus at most one half-written line at the end; ``repair_jsonl`` cuts that
line away before the file is appended to again. Records are keyed by (id, K): a resumed run skips
the pairs already present and writes only the missing ones, so nothing is lost or duplicated.

A multi-host run (``jax.process_count() > 1``) has each process append its batches to its own
``predictions.host{i}-of-{n}.jsonl`` (the same format and crash safety); process 0 then merges them
all into ``predictions.jsonl`` (``merge_predictions``: one record per (id, K), in item order, written
atomically) and deletes them.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import math
import os
import time

log = logging.getLogger("jaxflow.evaluation")

PREDICTIONS = "predictions.jsonl"
RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
CURVE_PNG = "truncation_curve.png"
LOCK = ".lock"
RUN_FILES = (PREDICTIONS, RUN_JSON, SUMMARY_JSON, SUMMARY_CSV, CURVE_PNG)
RECORD_KEYS = ("id", "K", "prediction", "score")
HOST_PREDICTIONS = "predictions.host{index}-of-{count}.jsonl"


class EvaluationError(ValueError):
    """A bad evaluation input or run directory; the message says what to fix (one line)."""


# --------------------------------------------------------------------------- JSON lines


def repair_jsonl(path: str) -> int:
    """Cut a half-written last line (no trailing newline) off a JSON-lines file.

    Returns the number of bytes removed (0 if the file ends with a newline, is empty or does not
    exist). Only the tail after the last newline is touched: complete lines are never changed.
    """
    if not os.path.exists(path):
        return 0
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # scan backwards in blocks for the last newline
        pos, block = size, 1 << 16
        last_nl = -1
        while pos > 0 and last_nl < 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                last_nl = start + i
            pos = start
        keep = last_nl + 1  # 0 when the file has no newline at all
        if keep == size:
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def read_records(path: str, *, complete_only: bool = False) -> list[dict]:
    """All records of a predictions file (which must end with a newline: call ``repair_jsonl``
    first). A malformed or incomplete complete line raises EvaluationError naming the line.
    complete_only: ignore a last line without its newline instead (a file another process may be
    appending to right now; the file is not changed)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if complete_only and not line.endswith("\n"):
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{path}:{lineno}: malformed record ({e.msg}); the file was edited or "
                                      "written by something else: fix that line or start over with --overwrite"
                                      ) from None
            if not isinstance(rec, dict) or any(k not in rec for k in RECORD_KEYS):
                raise EvaluationError(f"{path}:{lineno}: a record needs the keys {', '.join(RECORD_KEYS)}; "
                                      "fix that line or start over with --overwrite")
            out.append(rec)
    return out


def format_records(records: list[dict]) -> str:
    """One JSON object per line (non-finite scores are written as null), newline-terminated."""
    lines = []
    for r in records:
        r = dict(r)
        if isinstance(r.get("score"), float) and not math.isfinite(r["score"]):
            r["score"] = None
        lines.append(json.dumps(r, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


class PredictionLog:
    """Append-only predictions file of a run, opened for resuming.

    On open: the half-written last line (if any) is cut away and the complete records are read;
    ``done`` is the set of (id, K) already written. ``append(records)`` writes a batch's records
    (skipping pairs already done) with one write, then flush + fsync.
    """

    def __init__(self, path: str):
        self.path = path
        self.repaired_bytes = repair_jsonl(path)
        if self.repaired_bytes:
            log.warning("%s: removed a half-written last line (%d bytes) left by an interrupted run",
                        path, self.repaired_bytes)
        self.records = read_records(path)
        self.done: set[tuple[str, int]] = set()
        dupes = 0
        for r in self.records:
            key = (str(r["id"]), int(r["K"]))
            dupes += key in self.done
            self.done.add(key)
        if dupes:
            log.warning("%s: %d duplicate (id, K) record(s); the first of each is used", path, dupes)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, records: list[dict]) -> int:
        """Write the records whose (id, K) is not done yet; returns how many were written."""
        new = []
        for r in records:
            key = (str(r["id"]), int(r["K"]))
            if key not in self.done:
                self.done.add(key)
                new.append(r)
        if new:
            self._f.write(format_records(new))
            self._f.flush()
            os.fsync(self._f.fileno())
            self.records.extend(new)
        return len(new)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unique_records(records: list[dict]) -> dict[tuple[str, int], dict]:
    """(id, K) -> the first record of that pair."""
    out: dict[tuple[str, int], dict] = {}
    for r in records:
        out.setdefault((str(r["id"]), int(r["K"])), r)
    return out


# --------------------------------------------------------------------------- per-host files


def host_predictions(out: str, index: int, count: int) -> str:
    """The predictions file process `index` of `count` appends to in a multi-host run."""
    return os.path.join(out, HOST_PREDICTIONS.format(index=index, count=count))


def host_files(out: str) -> list[str]:
    """Every per-host predictions file in the run directory (of any process count), sorted."""
    return sorted(glob.glob(os.path.join(glob.escape(out), HOST_PREDICTIONS.format(index="*", count="*"))))


def known_records(out: str, *, skip: str | None = None) -> list[dict]:
    """The complete records of predictions.jsonl and of every per-host file but `skip`: what a host
    counts as done besides its own file (read only; a half-written last line is ignored)."""
    paths = [os.path.join(out, PREDICTIONS)] + [p for p in host_files(out) if p != skip]
    return [r for p in paths for r in read_records(p, complete_only=True)]


def merge_predictions(out: str, order: list[tuple[str, int]]) -> int:
    """Fold every per-host file into predictions.jsonl: one record per (id, K) (the first seen,
    predictions.jsonl's before the hosts'), listed in `order`; written to a temporary file and
    renamed, then the host files are deleted (a kill at any point loses nothing). A record whose
    (id, K) is not in `order` raises EvaluationError. Returns the number of records written."""
    hosts = host_files(out)
    main = os.path.join(out, PREDICTIONS)
    if not hosts:
        return 0
    repair_jsonl(main)
    recs = unique_records(read_records(main) + [r for p in hosts for r in read_records(p, complete_only=True)])
    wanted = set(order)
    stray = [key for key in recs if key not in wanted]
    if stray:
        raise EvaluationError(f"{out} has records of other items or layers (e.g. id {stray[0][0]!r}, K {stray[0][1]}): "
                              "use --overwrite to start over")
    text = format_records([recs[k] for k in order if k in recs])
    tmp = f"{main}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, main)
    _fsync_dir(out)
    for p in hosts:
        os.remove(p)
    return len(recs)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- run.json and the lock


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def param_differences(old: dict, new: dict) -> list[str]:
    """'key: X here, Y in run.json' for every parameter that differs."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            diffs.append(f"{k}: {_short(new.get(k))} now, {_short(old.get(k))} in run.json")
    return diffs


def _read_run_json(run_path: str) -> dict:
    try:
        with open(run_path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info.get("params"), dict):
            raise KeyError("params")
        return info
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise EvaluationError(f"{run_path} is unreadable; use --overwrite to start over") from None


def _refuse(out: str, diffs: list[str]) -> None:
    raise EvaluationError(f"{out} holds a different run ({'; '.join(diffs)}): use another --out, or "
                          "--overwrite to delete its predictions and start over")


def precheck_run_dir(out: str, params: dict) -> None:
    """Refuse early (before a model is loaded) if out holds a run whose run.json differs in one of
    the given parameters; parameters missing from ``params`` are not compared."""
    run_path = os.path.join(out, RUN_JSON)
    if not os.path.exists(run_path):
        return
    old = _read_run_json(run_path)["params"]
    params = json.loads(json.dumps(params))
    diffs = param_differences({k: old.get(k) for k in params}, params)
    if diffs:
        _refuse(out, diffs)


def open_run_dir(out: str, params: dict, *, overwrite: bool = False, extra: dict | None = None) -> dict:
    """Create or reopen a run directory for the run described by ``params`` (the parameters that
    decide the predictions). A directory of a different run is refused (EvaluationError naming the
    differing parameters) unless overwrite, which deletes the run's files first. Returns the
    run.json content (with ``resumed``: how many times the run was started before)."""
    os.makedirs(out, exist_ok=True)
    params = json.loads(json.dumps(params))  # the form it takes in run.json (tuples -> lists, ...)
    run_path = os.path.join(out, RUN_JSON)
    pred_path = os.path.join(out, PREDICTIONS)
    if overwrite:
        for p in [os.path.join(out, name) for name in RUN_FILES] + host_files(out):
            if os.path.exists(p):
                os.remove(p)
    info = None
    if os.path.exists(run_path):
        info = _read_run_json(run_path)
        diffs = param_differences(info["params"], params)
        if diffs:
            _refuse(out, diffs)
    elif os.path.exists(pred_path) and os.path.getsize(pred_path) > 0:
        raise EvaluationError(f"{pred_path} exists but {run_path} does not, so it cannot be checked against "
                              "this run: use another --out, or --overwrite to start over")
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if info is None:
        info = {"format": 1, "params": params, "created": now, "starts": []}
    info["starts"] = list(info.get("starts", [])) + [dict(extra or {}, time=now)]
    write_json_atomic(run_path, info)
    info["resumed"] = len(info["starts"]) - 1
    return info


class RunLock:
    """An exclusive advisory lock on DIR/.lock (released when the process ends, even by a kill).
    name: another lock file (the processes of a multi-host run but process 0 lock their own)."""

    def __init__(self, out: str, name: str = LOCK):
        self.path = os.path.join(out, name)
        self._f = None

    def __enter__(self):
        import fcntl

        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise EvaluationError(f"another evaluation is running in {os.path.dirname(self.path)} "
                                      f"(it holds {os.path.basename(self.path)}); wait for it or use another --out"
                                      ) from None
            raise
        return self

    def __exit__(self, *exc):
        import fcntl

        if self._f is not None:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None
