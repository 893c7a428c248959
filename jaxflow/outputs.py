"""Output folders that never destroy what jaxflow did not write.

Every script that writes a folder of results (demo, analyze, truncation_sweep, faithfulness) follows
one policy:

- before any computation, `check_out_dir` refuses an `--out` that is a file, cannot be written (the
  folder or its nearest existing parent), lies on a disk with less than `MIN_FREE_BYTES` free, or
  holds entries jaxflow did not write, unless `overwrite` is given;
- the results are written into a hidden temporary sibling folder and `publish` moves them in at the
  end: a new folder is one rename; into an existing folder only jaxflow's own entries are replaced,
  and the entries an earlier run wrote that this run did not are removed (no stale outputs beside
  new ones). Entries are recorded in a manifest (`MANIFEST`) inside the folder. An entry of the user's
  with the name of one of ours is never replaced, even with `overwrite`: the run is refused.

Every OS error (not writable, a file where a folder should be, disk full, read-only) becomes one
`error(...)` line.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

MANIFEST = ".jaxflow-outputs.json"  # {"entries": [names jaxflow wrote at the top of the folder]}
MIN_FREE_BYTES = 64 * 2**20


def _manifest(out: str) -> set[str]:
    """Entries a previous jaxflow run wrote into `out` (empty when it has no readable manifest)."""
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            return set(json.load(f).get("entries", []))
    except (OSError, ValueError, AttributeError):
        return set()


def foreign_entries(out: str) -> list[str]:
    """Entries of the existing folder `out` that no jaxflow run wrote (sorted)."""
    ours = _manifest(out) | {MANIFEST}
    return sorted(e for e in os.listdir(out) if e not in ours)


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_out_dir(out: str, *, overwrite: bool = False, error=ValueError, flag: str = "--out") -> str:
    """Validates an output folder before any work; returns its absolute path. See the module doc."""
    final = os.path.abspath(os.fspath(out))
    if os.path.exists(final) and not os.path.isdir(final):
        raise error(f"{flag} {out} exists and is not a folder: choose a folder")
    base = _nearest_existing(final)
    if not os.path.isdir(base):
        raise error(f"{flag} {out}: {base} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise error(f"{flag} {out}: {base} is not writable")
    try:
        free = shutil.disk_usage(base).free
    except OSError as e:
        raise error(f"{flag} {out}: cannot read the free space of {base}: {e.strerror or e}") from e
    if free < MIN_FREE_BYTES:
        raise error(f"{flag} {out}: only {free // 2**20} MiB free on its disk (need {MIN_FREE_BYTES // 2**20} MiB)")
    if os.path.isdir(final):
        foreign = foreign_entries(final)
        if foreign and not overwrite:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise error(f"{flag} {out} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} jaxflow did not "
                        f"write ({shown}): choose a new or empty folder, or pass --overwrite to write beside them "
                        "(only jaxflow's own outputs are replaced)")
    return final


def staging_dir(final: str, error=ValueError) -> str:
    """A new hidden temporary folder beside `final` (same disk, so `publish` renames)."""
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.partial-", dir=parent)
    except OSError as e:
        raise error(f"cannot write beside {final}: {e.strerror or e}") from e


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def publish(tmp: str, final: str, *, overwrite: bool = False, error=ValueError) -> list[str]:
    """Moves the entries of the finished folder `tmp` into `final` (see the module doc) and removes
    `tmp`; returns the entries written. On any error `tmp` is removed and nothing of the user's is
    touched."""
    try:
        entries = sorted(e for e in os.listdir(tmp) if e != MANIFEST)
        _write_manifest(tmp, entries)
        if not os.path.exists(final):
            os.rename(tmp, final)
            return entries
        if not os.path.isdir(final):
            raise error(f"--out {final} exists and is not a folder: choose a folder")
        ours = _manifest(final)
        present = set(os.listdir(final)) - {MANIFEST}
        foreign = present - ours
        clash = sorted(foreign & set(entries))
        if clash:
            raise error(f"--out {final} holds {clash[0]!r}, which jaxflow did not write and would replace: move it "
                        "or choose another --out")
        if foreign and not overwrite:
            raise error(f"--out {final} holds entries jaxflow did not write: pass --overwrite to write beside them")
        for name in sorted(ours & present):  # this run's and the earlier run's own outputs
            _remove(os.path.join(final, name))
        for name in entries:
            os.replace(os.path.join(tmp, name), os.path.join(final, name))
        os.replace(os.path.join(tmp, MANIFEST), os.path.join(final, MANIFEST))
        return entries
    except OSError as e:
        raise error(f"cannot write the results into {final}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_manifest(folder: str, entries: list[str]) -> None:
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"entries": entries, "written_by": "jaxflow"}, f, indent=1)
