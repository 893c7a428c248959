"""Output folders never destroy what jaxflow did not write (jaxflow.outputs): the checks before any
work and the publishing of the results, on hand-made folders."""
import os

import pytest

from jaxflow import outputs as O


def _run(final, files, overwrite=False):
    """One 'run': check, stage `files` (name -> text; a name with '/' makes a subfolder), publish."""
    O.check_out_dir(final, overwrite=overwrite)
    tmp = O.staging_dir(os.path.abspath(final))
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    return O.publish(tmp, os.path.abspath(final), overwrite=overwrite)


def test_new_folder_then_a_rerun_replaces_only_its_own_outputs(tmp_path):
    out = tmp_path / "out"
    assert _run(out, {"a.json": "1", "figs/x.png": "p"}) == ["a.json", "figs"]
    assert _run(out, {"a.json": "2", "b.png": "q"}) == ["a.json", "b.png"]
    assert sorted(os.listdir(out)) == [O.MANIFEST, "a.json", "b.png"]  # the stale figs/ of run 1 is gone
    assert (out / "a.json").read_text() == "2"
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".out.partial-")]


def test_a_folder_with_foreign_files_is_refused_and_survives_overwrite(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="1 entry jaxflow did not write .*notes.txt.*--overwrite"):
        _run(out, {"a.json": "1"})
    _run(out, {"a.json": "1"}, overwrite=True)
    _run(out, {"b.json": "2"}, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == [O.MANIFEST, "b.json", "notes.txt"]


def test_a_users_entry_with_the_name_of_an_output_is_never_replaced(tmp_path):
    out = tmp_path / "work"
    (out / "analysis").mkdir(parents=True)
    (out / "analysis" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="'analysis', which jaxflow did not write"):
        _run(out, {"analysis/cam.png": "x"}, overwrite=True)
    assert (out / "analysis" / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["analysis"]


def test_bad_out_paths_are_one_line(tmp_path, monkeypatch):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        O.check_out_dir(str(f))
    with pytest.raises(ValueError, match="is a file, so the folder cannot be created"):
        O.check_out_dir(str(f / "sub"))
    monkeypatch.setattr(O, "MIN_FREE_BYTES", 1 << 62)
    with pytest.raises(ValueError, match="MiB free"):
        O.check_out_dir(str(tmp_path / "new"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            O.check_out_dir(str(ro / "out"))
    finally:
        ro.chmod(0o700)
