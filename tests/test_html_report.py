"""report.html of analyze / truncation_sweep / faithfulness / evaluate, several images per run (--images: a
folder or a JSON-lines file), the one-line errors of bad batch input, and the all-zero CAM message.

Fast: the tiny random checkpoint (tests/conftest.py), the library functions in-process, two script runs for
the flags (both stop at input checking, before any model is loaded)."""
import base64
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from jaxflow.analysis.cam import CamResult
from jaxflow.outputs import MANIFEST
from jaxflow.viz import html_report as H
from jaxflow.viz.report import AnalyzeError, cam_zero_notes, read_items, run_analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "Is there a <script>alert(1)</script> zebra near the circle?"  # "script", "alert", "zebra": not in the vocab
EVIL_ESCAPED = "Is there a &lt;script&gt;alert(1)&lt;/script&gt; zebra near the circle?"


def _images(folder, n=3):
    os.makedirs(folder, exist_ok=True)
    colours = [(220, 30, 30), (30, 30, 220), (30, 180, 30)]
    paths = []
    for i in range(n):
        im = Image.new("RGB", (112, 112), (255, 255, 255))
        ImageDraw.Draw(im).ellipse((10 + 20 * i, 20, 60 + 20 * i, 70), fill=colours[i])
        p = os.path.join(folder, f"shape {i}.png")
        im.save(p)
        paths.append(p)
    return paths


def _self_contained(page: str):
    assert page.startswith("<!DOCTYPE html>")
    assert 'src="http' not in page and "src='http" not in page and "<script" not in page.lower()
    assert "<link" not in page and "url(" not in page  # no external style sheet or font
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert imgs, "no embedded figure"
    assert base64.b64decode(imgs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(re.findall(r"<img ", page)) == len(imgs)  # every image is embedded


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from jaxflow.convert import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


# --------------------------------------------------------------------------- the HTML functions


def test_escaping_tables_and_figures(tmp_path):
    t = H.table(("a", "<b>"), [("<script>x</script>", 0.5), (H.Raw("<i>ok</i>"), None)], highlight=(1,))
    assert "<script>" not in t and "&lt;script&gt;x&lt;/script&gt;" in t and "&lt;b&gt;" in t
    assert "<i>ok</i>" in t and "0.5000" in t and '<tr class="hl">' in t
    assert H.fmt(1e-7) == "1.000e-07" and H.fmt(float("nan")) == "NaN" and H.fmt(3) == "3" and H.fmt(None) == "\u2013"
    kv = H.kv_table({"question": '"q" & <x>', "methods": ["paper", "gradcam"]})
    assert "&quot;q&quot; &amp; &lt;x&gt;" in kv and "paper, gradcam" in kv
    png = tmp_path / "f.png"
    Image.new("RGB", (4, 4)).save(png)
    page = H.page("t <x>", H.section("s", H.figure(str(png), 'cap "<y>"')), "plain <z>")
    _self_contained(page)
    assert "t &lt;x&gt;" in page and "cap &quot;&lt;y&gt;&quot;" in page and "plain &lt;z&gt;" in page


def test_tokens_collapse_the_image_and_flag_unknown_words(tokenizer):
    ids = tokenizer("USER : <image> Is there a zebra ? ASSISTANT :", add_special_tokens=True)["input_ids"]
    img = tokenizer.convert_tokens_to_ids("<image>")
    i = ids.index(img)
    ids = ids[:i] + [img] * 64 + ids[i + 1:]
    pad = [tokenizer.pad_token_id] * 3
    views = H.token_views(tokenizer, pad + ids, image_token_id=img, attention_mask=[0] * 3 + [1] * len(ids))
    assert [v.kind for v in views].count("image") == 1 and [v for v in views if v.kind == "image"][0].count == 64
    unk = [v for v in views if v.kind == "unk"]
    assert len(unk) == 1 and unk[0].id == tokenizer.unk_token_id and len(views) == len(ids) - 63
    html = H.prompt_html(tokenizer, ids, image_token_id=img, texts=["Is there a zebra ?"])
    assert "[image: 64 tokens]" in html and 'class="tok unk"' in html
    assert "words the tokenizer does not know" in html and "&#x27;zebra&#x27;" in html
    assert H.unknown_words(tokenizer, "a zebra, an okapi and a red circle") == ["zebra", "okapi"]
    assert H.unknown_words(tokenizer, "a red circle") == []
    table = H.unknown_words_table(tokenizer, ["a zebra", "two zebra", "an okapi"])
    assert "zebra" in table and "okapi" in table and H.unknown_words_table(tokenizer, ["a red circle"]) is None


# --------------------------------------------------------------------------- all-zero CAM maps


def _cam_result(raw):
    raw = {m: np.asarray(v, np.float32) for m, v in raw.items()}
    shape = next(iter(raw.values())).shape
    return CamResult(maps=raw, raw=raw, token_maps=None, token_raw=None, token_mask=np.ones((shape[0], 1), bool),
                     token_ids=np.zeros((shape[0], 1), np.int32), grids=np.tile([shape[2], shape[3]], (shape[0], 1)),
                     token_positions=np.zeros((shape[0], 1), np.int32), scores=np.zeros((shape[0], 1), np.float32))


def test_all_zero_maps_say_why():
    L = 5
    live = np.ones((1, L, 2, 2))
    live[:, L - 1] = 0  # the last layer is zero for every method (the site), never reported
    gradcam = live.copy()
    gradcam[:, 1:3] = 0
    notes = cam_zero_notes(_cam_result({"paper": live, "gradcam": gradcam}))
    assert notes == ["method gradcam gives all-zero maps at layers 1-2: every image token's weighted channel sum "
                     "is negative there, and the ReLU removes it; paper is not all-zero at those layers"]
    # no computed method is non-zero there: say so, and name the methods not computed
    allzero = np.zeros((1, L, 2, 2))
    notes = cam_zero_notes(_cam_result({"gradcam": allzero}))
    assert len(notes) == 1 and notes[0].startswith("method gradcam gives all-zero maps at layers 0-3: every image "
                                                   "token's weighted channel sum is negative there")
    assert "try --methods gradcam,paper,gradxact" in notes[0]
    paper = live.copy()
    paper[:, 2] = 0  # non-zero at layer 1 only
    notes = cam_zero_notes(_cam_result({"gradcam": gradcam, "paper": paper}))
    assert notes[0].endswith("; paper is not all-zero at layer 1") and notes[1].startswith("method paper gives "
                                                                                          "all-zero maps at layer 2")
    assert cam_zero_notes(_cam_result({"paper": live, "gradcam": live})) == []


# --------------------------------------------------------------------------- bad batch input


def test_bad_items_fail_with_one_line_and_write_nothing(tiny_checkpoint, tmp_path):
    from jaxflow.analysis.sweep_report import run_sweep_report

    good = _images(str(tmp_path / "imgs"), 1)[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"image": good, "question": "Is there a circle?"}) + "\n\n{not json\n")
    no_q = tmp_path / "noq.jsonl"
    no_q.write_text(json.dumps({"image": good}) + "\n")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "imgs/nope.png", "question": "Is there a circle?"}) + "\n")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    broken_jsonl = tmp_path / "broken.jsonl"
    broken_jsonl.write_text(json.dumps({"image": "broken.png", "question": "Is there a circle?"}) + "\n")
    cases = [
        (str(tmp_path / "nowhere"), "--images not found"),
        (str(tmp_path / "empty"), "holds no image files"),
        (str(bad_json), f"{bad_json}:3: malformed JSON"),
        (str(no_q), f"{no_q}:1: "),
        (str(missing), f"{missing}:1: image not found: {tmp_path / 'imgs' / 'nope.png'}"),
        (str(broken_jsonl), f"{broken_jsonl}:1: cannot read image"),
    ]
    for items, phrase in cases:
        for call, err in ((lambda o: run_analysis(tiny_checkpoint, None, "Is there a circle?", out=o, items=items,
                                                  progress=None), AnalyzeError),
                          (lambda o: run_sweep_report(tiny_checkpoint, None, "Is there a circle?", out=o, items=items),
                           ValueError)):
            with pytest.raises(err) as e:
                call(str(tmp_path / "out"))
            assert phrase in str(e.value) and "\n" not in str(e.value), (phrase, str(e.value))
            assert not (tmp_path / "out").exists()
    with pytest.raises(AnalyzeError, match="mutually exclusive"):
        run_analysis(tiny_checkpoint, good, "q?", out=str(tmp_path / "out"), items=str(tmp_path / "imgs"))
    assert not (tmp_path / "out").exists()
    assert [it.name for it in read_items(str(tmp_path / "imgs"), "q?")] == ["00_shape_0"]
    assert sorted(os.listdir(tmp_path)) == sorted(["imgs", "empty", "bad.jsonl", "noq.jsonl", "missing.jsonl",
                                                    "broken.png", "broken.jsonl"])


def _script(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_scripts_refuse_bad_batch_flags(tmp_path):
    """Two script runs: --image with --images, and a malformed JSON-lines line; one line, exit 2, nothing written."""
    folder = tmp_path / "imgs"
    _images(str(folder), 1)
    res = _script("analyze.py", f"--image={folder / 'shape 0.png'}", f"--images={folder}", f"--out={tmp_path / 'a'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == ["error: --image and --images are mutually exclusive: pass one"]
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"image": "imgs/shape 0.png", "question": "Is there a circle?"}\n{"image": 3}\n')
    res = _script("truncation_sweep.py", f"--images={bad}", f"--out={tmp_path / 's'}")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: ") and '"image"' in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["imgs", "items.jsonl"]


# --------------------------------------------------------------------------- several images, end to end


def test_analyze_a_folder_writes_items_and_one_report(tiny_checkpoint, tmp_path, monkeypatch):
    """Two images of a folder in one batch: a sub-folder each, one report (summary table, a section per item,
    figures embedded, the question escaped, <unk> flagged); a method forced all-zero at a layer is explained
    on the console and in the report."""
    import jaxflow.viz.report as R

    _images(str(tmp_path / "imgs"), 2)
    real = R.llava_cams

    def zero_gradcam_layer1(*a, **kw):  # the case "every weighted channel sum negative", made deterministic
        res = real(*a, **kw)
        for d in (res.raw, res.maps):
            for m in ("paper", "gradcam"):
                d[m] = np.array(d[m])  # writable
                n_layers = d[m].shape[1]
                d[m][:, :n_layers - 1, 0, 0] = np.maximum(d[m][:, :n_layers - 1, 0, 0], 1.0)  # no other zero layer
            d["gradcam"][:, 1] = 0
        return res

    monkeypatch.setattr(R, "llava_cams", zero_gradcam_layer1)
    lines = []
    out = tmp_path / "out"
    res = run_analysis(tiny_checkpoint, None, EVIL, out=str(out), items=str(tmp_path / "imgs"), answer="yes",
                       methods=("paper", "gradcam"), batch_size=8, progress=lines.append)
    names = ["00_shape_0", "01_shape_1"]
    assert sorted(os.listdir(out)) == sorted(names + ["items.json", "report.html", MANIFEST])
    assert json.load(open(out / MANIFEST))["entries"] == sorted(names + ["items.json", "report.html"])
    assert [os.path.basename(s["out"]) for s in res["items"]] == names
    for n in names:
        s = json.load(open(out / n / "summary.json"))
        assert sorted(os.listdir(out / n)) == s["files"] and "cam_paper.png" in s["files"]
        assert s["question"] == EVIL and s["answer"] == "yes" and s["answer_given"]
        assert s["cam_zero_layers"] == {"paper": [3], "gradcam": [1, 3]}  # 3: the last layer, zero by the site
        a = np.load(out / n / "arrays.npz")
        np.testing.assert_array_equal(a["input_ids"][a["answer_mask"]], s["answer_ids"])  # padding removed
        assert a["attention_mask"].all() and a["attention_rows"].shape[-1] == a["input_ids"].shape[0]
    assert json.load(open(out / "items.json"))["items"][1]["folder"] == "01_shape_1"
    msg = ("method gradcam gives all-zero maps at layer 1: every image token's weighted channel sum is negative "
           "there, and the ReLU removes it; paper is not all-zero at that layer")
    assert any(line == f"note: 00_shape_0: {msg}" for line in lines), lines
    page = (out / "report.html").read_text()
    _self_contained(page)
    assert EVIL not in page and EVIL_ESCAPED in page
    assert page.count('class="tok unk"') >= 6 and "words the tokenizer does not know" in page
    assert "&#x27;zebra&#x27;" in page and "[image: 64 tokens]" in page
    assert msg.replace("'", "&#x27;") in page
    assert page.index("<h2>Summary</h2>") < page.index('id="item-00_shape_0"') < page.index('id="item-01_shape_1"')
    for heading in ("Model", "Settings", "Per layer", "Answer tokens", "Prompt as tokenised"):
        assert f">{heading}</h" in page, heading
    assert ">tiny-random<" in page and ">float32<" in page and ">decoder layers<" in page
    assert page.count('src="data:image/png;base64,') == 2 * 9  # every figure of both items


def test_sweep_a_jsonl_in_batches_and_its_report(tiny_checkpoint, tmp_path):
    """Three JSON-lines items (relative and absolute paths) in batches of 2: per-item answers.json + sweep.png
    equal to a run of each alone, one report with the per-K tables; the single-image run's report too."""
    from jaxflow.analysis.sweep_report import run_sweep_report, sweep_report
    from jaxflow.pipeline import load_bundle

    paths = _images(str(tmp_path / "imgs"), 3)
    jl = tmp_path / "items.jsonl"
    qs = ["Is there a red circle?", EVIL, "Is there a green circle?"]
    jl.write_text("\n".join(json.dumps({"image": p, "question": q}) for p, q in
                            zip(["imgs/shape 0.png", paths[1], "imgs/shape 2.png"], qs)) + "\n")
    out = tmp_path / "sweep"
    reports, files = run_sweep_report(tiny_checkpoint, None, None, out=str(out), items=str(jl), batch_size=2,
                                      max_new_tokens=2, layers=[0, 2])
    names = ["00_shape_0", "01_shape_1", "02_shape_2"]
    assert sorted(os.listdir(out)) == sorted(names + ["items.json", "report.html", MANIFEST])
    bundle = load_bundle(tiny_checkpoint)
    alone = sweep_report(bundle, paths[2], qs[2], max_new_tokens=2, layers=[0, 2])  # the second batch's only row
    data = json.load(open(out / names[2] / "answers.json"))
    assert data["answers"] == alone.answers == reports[2].answers and data["layers"] == [0, 2, 4]
    np.testing.assert_allclose(data["first_token_probability"], np.exp(alone.first_token_logprob), atol=1e-5)
    assert sorted(os.listdir(out / names[1])) == ["answers.json", "sweep.png"]
    assert json.load(open(out / names[1] / "answers.json"))["question"] == EVIL
    page = (out / "report.html").read_text()
    _self_contained(page)
    assert EVIL not in page and EVIL_ESCAPED in page and 'class="tok unk"' in page
    assert page.count("<h3>Per cut layer K</h3>") == 3 and "<h2>Summary</h2>" in page
    assert "P(first token)" in page and "cliff layer" in page
    # one image: report.html beside answers.json, in the manifest
    one = tmp_path / "one"
    rep, files = run_sweep_report(tiny_checkpoint, paths[2], qs[2], out=str(one), max_new_tokens=2, layers=[0, 2])
    assert sorted(os.listdir(one)) == sorted(["answers.json", MANIFEST, "report.html", "sweep.png"])
    assert "report.html" in json.load(open(one / MANIFEST))["entries"]
    page = (one / "report.html").read_text()
    _self_contained(page)
    assert "<h2>Summary</h2>" not in page and page.count("<h3>Per cut layer K</h3>") == 1


def test_faithfulness_and_evaluate_reports(tiny_checkpoint, tmp_path):
    from jaxflow.analysis.faithfulness import run_faithfulness
    from jaxflow.evaluation import EvalConfig, run_evaluation

    res, files = run_faithfulness(tiny_checkpoint, out=str(tmp_path / "faith"), n=2, batch_size=2,
                                  methods=("paper", "gradcam"), progress=False)
    assert files[-1].endswith("report.html")
    assert "report.html" in json.load(open(tmp_path / "faith" / MANIFEST))["entries"]
    page = (tmp_path / "faith" / "report.html").read_text()
    _self_contained(page)
    for phrase in ("paper pointing", "gradcam energy in box", ">chance<", "Best layer per method",
                   "Prompt as tokenised", ">tiny-random<"):
        assert phrase in page, phrase
    assert res.zero_maps["paper"].shape == (2, 4) and res.zero_maps["paper"][:, -1].all()

    out = tmp_path / "eval"
    cfg = dict(dataset="scienceqa", checkpoint=tiny_checkpoint, out=str(out), sweep="0,2", batch_size=4,
               progress=False, max_new_tokens=2)
    r = run_evaluation(EvalConfig(**cfg))
    assert r.files["report"] == str(out / "report.html")
    page = (out / "report.html").read_text()
    _self_contained(page)
    assert "Metrics per cut layer K" in page and ">cliff layer<" in page and "baseline (untruncated)" in page
    assert "Prompt as tokenised" in page and "[image: 64 tokens]" in page and "Predictions of the first 3" in page
    assert ">0.0100<" in page  # epsilon
    # a finished run re-run with another epsilon: the report is rewritten with it
    run_evaluation(EvalConfig(epsilon=0.25, **cfg))
    assert ">0.2500<" in (out / "report.html").read_text()
