"""Bad input to the scripts: one line on stderr saying what is wrong and how to fix it, a non-zero exit,
nothing written; and every script's --help exits 0. One subprocess per case (the scripts as a user runs
them), on the embedded toy model or a tiny checkpoint; the library-level checks behind each case have
their own tests (test_image, test_prompts, test_broken_models, test_qwen_vl)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "scripts", "*.py")))


def _run(script, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero(script):
    res = _run(script, "--help", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip()  # the usage: the script's docstring and its flags


def _one_line_error(res, *needles):
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def _corrupt_preprocessor(tiny_checkpoint, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    (d / "preprocessor_config.json").write_text('{"size": 112,,}')
    return str(d)


CASES = {
    "image placeholder in the question": (lambda tmp, ck: dict(question="What is <image> here?"),
                                          ["'<image>'", "remove it from the question"]),
    "question longer than the positions": (lambda tmp, ck: dict(question="red " * 600), ["positions"]),
    "corrupt json in the checkpoint": (lambda tmp, ck: dict(checkpoint=_corrupt_preprocessor(ck, tmp)),
                                       ["preprocessor_config.json is not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_demo_bad_input_is_one_line_and_writes_nothing(case, tiny_checkpoint, tmp_path):
    """In process (the script prints `error: ` + this message and exits 2, as the subprocess case below)."""
    from jaxflow import tiny
    from jaxflow.demo import DemoError, run_demo

    kw = dict(checkpoint=tiny_checkpoint, image=tiny.DEMO_IMAGE, question=tiny.DEMO_QUESTION)
    make_args, needles = CASES[case]
    kw.update(make_args(tmp_path, tiny_checkpoint))
    out = tmp_path / "out"
    with pytest.raises(DemoError) as e:
        run_demo(kw["checkpoint"], kw["image"], kw["question"], out=str(out), analyses=False, progress=None)
    assert "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert not out.exists()


def test_demo_script_on_a_folder_as_image(tmp_path):
    out = tmp_path / "out"
    res = _run("demo.py", f"--out={out}", "--noanalyses", f"--image={tmp_path}")
    _one_line_error(res, "is a folder, not an image file")
    assert not out.exists()


def test_a_16_bit_grayscale_image_is_read_by_its_bit_depth(tmp_path):
    """A 16-bit ramp 0..65535 must come out as 0..255 (PIL's convert("RGB") alone clips at 255: white)."""
    from jaxflow.data.image import load_image

    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, axis=0)  # (4, 256)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = np.asarray(load_image(tmp_path / "g16.png"))  # (4, 256, 3)
    want = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
    np.testing.assert_array_equal(got[..., 0], want)
    assert (got[..., 0] == got[..., 2]).all() and got[0, 128, 0] == 128


def test_converting_a_directory_without_tokenizer(tmp_path):
    import qwen_vl_reference as QR

    res = _run("convert_checkpoint.py", f"--hf_dir={QR.model_dir()}", f"--out={tmp_path / 'o'}")
    _one_line_error(res, "holds no tokenizer", "--allow_no_tokenizer")
    assert not (tmp_path / "o").exists()
