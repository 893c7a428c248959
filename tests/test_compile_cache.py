"""Every script keeps compiled programs in a persistent cache (JAXFLOW_CACHE_DIR), unless --nocompile_cache."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(tmp_path, cache, *extra):
    env = dict(os.environ, JAXFLOW_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "truncation_sweep.py"), "--layers=0,4",
                           "--max_new_tokens=2", f"--out={tmp_path / 'out'}", "--overwrite", *extra],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def test_scripts_fill_the_cache_unless_told_not_to(tmp_path):
    res = _sweep(tmp_path, tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(os.listdir(tmp_path / "cache")) > 0
    res = _sweep(tmp_path, tmp_path / "off", "--nocompile_cache")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (tmp_path / "off").exists()
