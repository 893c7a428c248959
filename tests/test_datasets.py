"""Benchmark loaders on the fixture data sets (real file formats), and their errors."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from jaxflow.data.datasets import (BENCHMARKS, CAPTION_PROMPT, DatasetError, Item, dataset_options, load_dataset)
from jaxflow.data.fixtures import write_fixtures
from jaxflow.data.prompts import format_prompt
from jaxflow.metrics import score

SHORT = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fixtures"))
    return root, write_fixtures(root)


@pytest.fixture()
def fx(tmp_path, fixture_root):
    """A private, writable copy of the fixtures (tests corrupt it)."""
    root, paths = fixture_root
    dst = str(tmp_path / "fx")
    shutil.copytree(root, dst)
    return {k: (d.replace(root, dst), i.replace(root, dst)) for k, (d, i) in paths.items()}


def _rewrite_line(path: str, lineno: int, new: str) -> None:
    lines = open(path).read().splitlines()
    lines[lineno - 1] = new
    open(path, "w").write("\n".join(lines) + "\n")


def _edit_json(path: str, fn) -> None:
    obj = json.load(open(path))
    fn(obj)
    json.dump(obj, open(path, "w"))


# ---------------------------------------------------------------- fixtures and loading


def test_fixtures_small_and_complete(fixture_root):
    root, paths = fixture_root
    assert set(paths) == set(BENCHMARKS)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    assert total < 200_000
    for data_dir, image_dir in paths.values():
        assert os.path.isdir(data_dir) and os.path.isdir(image_dir)


def test_pope_coco_files(fx):
    ds = load_dataset("pope", *fx["pope"])
    assert len(ds) == 12 and ds.stats.loaded == 12 and ds.stats.skipped == 0
    assert [it.split for it in ds][::4] == ["random", "popular", "adversarial"]
    it = ds[0]
    assert isinstance(it, Item) and it.id == "random/1" and it.dataset == "pope"
    assert it.question == "Is there a dog in the image?"
    assert it.formatted_question == "Is there a dog in the image?" + SHORT
    assert it.answers == ("yes",) and it.answer == "yes"
    assert it.image.endswith("COCO_val2014_000000000042.jpg") and os.path.isfile(it.image)
    assert it.metadata["source"] == "coco_pope_random.json:1"
    assert sorted(a for it in ds for a in it.answers).count("yes") == 6
    assert len(ds.by_id()) == 12
    # the prompt the model sees
    assert format_prompt(it.formatted_question).endswith("USER: <image>\nIs there a dog in the image?" + SHORT
                                                         + " ASSISTANT:")


def test_pope_llava_file_matches_coco_files(fx):
    coco = load_dataset("pope", *fx["pope"], source="coco")
    llava = load_dataset("pope", *fx["pope"], source="llava")
    key = lambda it: (it.split, it.image, it.question, it.answers, it.formatted_question)  # noqa: E731
    assert sorted(map(key, coco)) == sorted(map(key, llava))  # labels looked up in coco_pope_*.json
    assert llava[0].metadata["source"] == "llava_pope_test.jsonl:1"
    # split selection and a single file as data_dir
    adv = load_dataset("pope", *fx["pope"], source="llava", splits=["adversarial"])
    assert len(adv) == 4 and {it.split for it in adv} == {"adversarial"} and adv.stats.filtered == 8
    one = load_dataset("pope", os.path.join(fx["pope"][0], "coco_pope_popular.json"), fx["pope"][1])
    assert len(one) == 4 and {it.split for it in one} == {"popular"}
    assert len(load_dataset("pope", *fx["pope"], limit=5)) == 5
    assert len(load_dataset("pope", *fx["pope"], limit=0)) == 0
    two = load_dataset("pope", *fx["pope"], splits="random,adversarial")
    assert [it.split for it in two][::4] == ["random", "adversarial"] and len(two) == 8
    with pytest.raises(ValueError, match="unknown POPE source"):
        load_dataset("pope", *fx["pope"], source="vqa")


def test_pope_llava_labels_inline_and_missing_label_file(fx):
    data_dir, image_dir = fx["pope"]
    path = os.path.join(data_dir, "llava_pope_test.jsonl")
    row = json.loads(open(path).readline())
    _rewrite_line(path, 1, json.dumps(dict(row, label="no")))  # an inline label wins
    assert load_dataset("pope", data_dir, image_dir, source="llava")[0].answers == ("no",)
    os.remove(os.path.join(data_dir, "coco_pope_adversarial.json"))
    with pytest.raises(DatasetError) as e:
        load_dataset("pope", data_dir, image_dir, source="llava")
    assert e.value.path.endswith("coco_pope_adversarial.json") and "file not found" in str(e.value)
    assert "llava_pope_test.jsonl" in str(e.value) and "line 9" in str(e.value)


def test_textvqa(fx):
    ds = load_dataset("textvqa", *fx["textvqa"])
    assert len(ds) == 3
    it = ds[0]
    assert it.id == "34602" and len(it.answers) == 10 and it.split == "val"
    assert it.image.endswith(os.path.join("train_images", "0a1b2c3d4e5f6071.jpg"))
    assert it.formatted_question == "what does the sign say?\nReference OCR token: stop" + SHORT
    assert ds[2].formatted_question.startswith("what is written on the sign?\nReference OCR token: blue, sky\n")
    as_file = load_dataset("textvqa", os.path.join(fx["textvqa"][0], "TextVQA_0.5.1_val.json"), fx["textvqa"][1])
    assert [x.id for x in as_file] == [x.id for x in ds]
    no_ocr = load_dataset("textvqa", *fx["textvqa"], ocr=False)
    assert no_ocr[0].formatted_question == "what does the sign say?" + SHORT
    assert it.metadata["ocr_tokens"] == ["stop"]
    # the reference answers score themselves perfectly
    assert score("textvqa", {x.id: x.answers[0] for x in ds}, ds)["accuracy"] == pytest.approx(
        (1.0 + 1.0 + 1.0) / 3)


def test_scienceqa(fx):
    ds = load_dataset("scienceqa", *fx["scienceqa"])
    # test split: 1, 2, 3, 5; problem 3 has no image -> filtered; 4 is train
    assert [it.id for it in ds] == ["1", "2", "5"]
    assert ds.stats.filtered == 1 and ds.stats.records == 4
    assert ds[0].formatted_question == (
        "Context: The picture shows three shapes.\nWhich shape is red?\nA. circle\nB. square\nC. triangle\n"
        "Answer with the option's letter from the given choices directly.")
    # an empty hint gives no "Context:" line
    assert ds[1].formatted_question == (
        "What color is the square?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly.")
    assert [it.answers for it in ds] == [("A",), ("B",), ("C",)]
    assert ds[0].metadata["choices"] == ["circle", "square", "triangle"] and ds[0].split == "test"
    assert [it.id for it in load_dataset("scienceqa", *fx["scienceqa"], split="train")] == ["4"]
    assert score("scienceqa", {"1": "A", "2": "B. blue", "5": "D"}, ds)["accuracy"] == pytest.approx(2 / 3)


def test_scienceqa_official_image_layout(fx):
    data_dir, image_dir = fx["scienceqa"]
    os.makedirs(os.path.join(image_dir, "test"))
    for pid in ("1", "2", "5"):
        shutil.move(os.path.join(image_dir, pid), os.path.join(image_dir, "test", pid))
    ds = load_dataset("scienceqa", data_dir, image_dir)
    assert ds[0].image == os.path.join(image_dir, "test", "1", "image.png")


def test_chair(fx):
    data_dir, image_dir = fx["chair"]
    ds = load_dataset("chair", data_dir, image_dir)
    assert len(ds) == 4 and ds.stats.filtered == 0
    expected_order = [str(i) for i in random.Random(0).sample([42, 73, 74, 133], 4)]
    assert [it.id for it in ds] == expected_order
    by_id = ds.by_id()
    # image 42: instances dog, person; captions mention man (person), dog
    assert by_id["42"].answers == ("dog", "person")
    # image 74: instances cat, chair, dining table; captions: cat, chair, table (-> dining table)
    assert by_id["74"].answers == ("cat", "chair", "dining table")
    assert by_id["42"].question == by_id["42"].formatted_question == CAPTION_PROMPT
    assert by_id["42"].image.endswith("COCO_val2014_000000000042.jpg")
    # the parent folder works too (COCO zips put the files under annotations/)
    assert [it.id for it in load_dataset("chair", os.path.dirname(data_dir), image_dir)] == expected_order
    # a fixed seed gives a fixed sample; n_images samples without replacement
    two = load_dataset("chair", data_dir, image_dir, n_images=2, seed=3)
    assert [it.id for it in two] == [str(i) for i in random.Random(3).sample([42, 73, 74, 133], 2)]
    assert [it.id for it in load_dataset("chair", data_dir, image_dir, n_images=2, seed=3)] == [it.id for it in two]
    assert two.stats.filtered == 2
    m = score("chair", {it.id: "A dog and a person." for it in ds}, ds)
    # mentions dog, person in each of 4 captions; only image 42 has both -> 3 captions hallucinate
    assert m["chair_s"] == pytest.approx(3 / 4) and m["mentions"] == 8


def test_dispatcher_options(fx):
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("vqav2", *fx["pope"])
    with pytest.raises(TypeError, match="unknown option.*ocr"):
        load_dataset("pope", *fx["pope"], ocr=True)
    assert dataset_options("chair") == ("n_images", "image_ids")
    assert set(dataset_options("pope")) == {"splits", "source"}


# ---------------------------------------------------------------- errors


def test_malformed_json_line_names_file_and_line(fx):
    data_dir, image_dir = fx["pope"]
    path = os.path.join(data_dir, "coco_pope_random.json")
    _rewrite_line(path, 3, '{"question_id": 3, "image": ')
    with pytest.raises(DatasetError) as e:
        load_dataset("pope", data_dir, image_dir)
    assert e.value.path == path and e.value.line == 3
    assert str(e.value).startswith(f"{path}:3: malformed JSON line")
    ds = load_dataset("pope", data_dir, image_dir, skip_bad=True)
    assert len(ds) == 11 and ds.stats.skipped == 1 and ds.stats.records == 12
    assert ds.stats.problems[0].startswith(f"{path}:3:")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("text"), "missing field 'text'"),
    (lambda r: r.update(label="maybe"), "label must be 'yes' or 'no'"),
    (lambda r: r.update(question_id=[1]), "field 'question_id' must be"),
])
def test_bad_pope_record(fx, edit, message):
    data_dir, image_dir = fx["pope"]
    path = os.path.join(data_dir, "coco_pope_popular.json")
    row = json.loads(open(path).read().splitlines()[1])
    edit(row)
    _rewrite_line(path, 2, json.dumps(row))
    with pytest.raises(DatasetError, match=message) as e:
        load_dataset("pope", data_dir, image_dir)
    assert str(e.value).startswith(f"{path}:2:")
    assert load_dataset("pope", data_dir, image_dir, skip_bad=True).stats.skipped == 1


def test_missing_image(fx):
    data_dir, image_dir = fx["pope"]
    missing = os.path.join(image_dir, "COCO_val2014_000000000073.jpg")
    os.remove(missing)
    with pytest.raises(DatasetError) as e:
        load_dataset("pope", data_dir, image_dir)
    path = os.path.join(data_dir, "coco_pope_random.json")
    assert str(e.value) == f"{path}:3: image not found: {missing}"
    ds = load_dataset("pope", data_dir, image_dir, skip_bad=True)
    # image 73 is in random lines 3 and 4 only
    assert len(ds) == 10 and ds.stats.skipped == 2 and ds.stats.loaded == 10
    assert len(load_dataset("pope", data_dir, image_dir, check_images=False)) == 12


def test_missing_files(fx, tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(DatasetError, match="no POPE file found") as e:
        load_dataset("pope", empty, fx["pope"][1])
    assert e.value.path == empty
    with pytest.raises(DatasetError, match="file not found") as e:
        load_dataset("pope", empty, fx["pope"][1], splits=["random"], source="coco")
    assert e.value.path == os.path.join(empty, "coco_pope_random.json")
    shutil.copy(os.path.join(fx["pope"][0], "coco_pope_random.json"), empty)
    with pytest.raises(DatasetError, match="file not found") as e:  # one split of two is missing
        load_dataset("pope", empty, fx["pope"][1], splits=["random", "popular"])
    assert e.value.path == os.path.join(empty, "coco_pope_popular.json")
    with pytest.raises(DatasetError, match="directory not found"):
        load_dataset("pope", str(tmp_path / "nowhere"), fx["pope"][1])
    for name, fname in [("textvqa", "TextVQA_0.5.1_val.json"), ("scienceqa", "pid_splits.json"),
                        ("chair", "captions_val2014.json")]:
        data_dir, image_dir = fx[name]
        os.remove(os.path.join(data_dir, fname))
        with pytest.raises(DatasetError, match="file not found") as e:
            load_dataset(name, data_dir, image_dir, skip_bad=True)  # a missing file is never skipped
        assert e.value.path.endswith(fname)


def test_textvqa_errors(fx):
    data_dir, image_dir = fx["textvqa"]
    path = os.path.join(data_dir, "TextVQA_0.5.1_val.json")
    _edit_json(path, lambda o: o["data"][1].pop("answers"))
    with pytest.raises(DatasetError) as e:
        load_dataset("textvqa", data_dir, image_dir)
    assert str(e.value) == f"{path} (data[1], question_id 34603): missing field 'answers'"
    ds = load_dataset("textvqa", data_dir, image_dir, skip_bad=True)
    assert [it.id for it in ds] == ["34602", "34604"] and ds.stats.skipped == 1
    with open(path, "w") as f:
        f.write('{"data": [\n  {"question_id": 1,\n  oops}\n]}\n')
    with pytest.raises(DatasetError, match="malformed JSON") as e:
        load_dataset("textvqa", data_dir, image_dir, skip_bad=True)
    assert e.value.path == path and e.value.line == 3
    json.dump({"questions": []}, open(path, "w"))
    with pytest.raises(DatasetError, match="'data' list"):
        load_dataset("textvqa", data_dir, image_dir)


def test_scienceqa_errors(fx):
    data_dir, image_dir = fx["scienceqa"]
    problems = os.path.join(data_dir, "problems.json")
    _edit_json(problems, lambda o: o["2"].update(answer=7))
    with pytest.raises(DatasetError) as e:
        load_dataset("scienceqa", data_dir, image_dir)
    assert str(e.value) == f"{problems} (problem 2): answer index 7 out of range for 2 choices"
    ds = load_dataset("scienceqa", data_dir, image_dir, skip_bad=True)
    assert [it.id for it in ds] == ["1", "5"] and ds.stats.skipped == 1 and ds.stats.filtered == 1
    with pytest.raises(DatasetError, match="no split 'dev'"):
        load_dataset("scienceqa", data_dir, image_dir, split="dev")
    os.remove(os.path.join(image_dir, "5", "image.png"))
    with pytest.raises(DatasetError, match=r"\(problem 2\): answer index"):
        load_dataset("scienceqa", data_dir, image_dir)  # the first bad problem is still problem 2
    ds = load_dataset("scienceqa", data_dir, image_dir, skip_bad=True)
    assert [it.id for it in ds] == ["1"] and ds.stats.skipped == 2
    _edit_json(problems, lambda o: o["2"].update(answer=1))
    image5 = os.path.join(image_dir, "5", "image.png")
    with pytest.raises(DatasetError) as e:
        load_dataset("scienceqa", data_dir, image_dir)
    assert str(e.value) == f"{problems} (problem 5): image not found: {image5}"
    _edit_json(os.path.join(data_dir, "pid_splits.json"), lambda o: o["test"].append("99"))
    ds = load_dataset("scienceqa", data_dir, image_dir, skip_bad=True)
    # problem 5 (image) and problem 99 (not in problems.json, named in pid_splits.json)
    assert [it.id for it in ds] == ["1", "2"] and ds.stats.skipped == 2
    assert ds.stats.problems[1] == f"{os.path.join(data_dir, 'pid_splits.json')}: problem 99 of split 'test' " \
                                   "is not in problems.json"


def test_chair_errors(fx):
    data_dir, image_dir = fx["chair"]
    instances = os.path.join(data_dir, "instances_val2014.json")
    _edit_json(instances, lambda o: o["annotations"][0].update(category_id=999))  # an annotation of image 42
    with pytest.raises(DatasetError) as e:
        load_dataset("chair", data_dir, image_dir)
    assert str(e.value) == f"{instances} (annotations[0]): unknown category_id 999 (image 42)"
    ds = load_dataset("chair", data_dir, image_dir, skip_bad=True)
    assert len(ds) == 3 and "42" not in ds.by_id() and ds.stats.skipped == 1
    with open(instances, "w") as f:
        f.write("{\n")
    with pytest.raises(DatasetError, match="malformed JSON") as e:
        load_dataset("chair", data_dir, image_dir)
    assert e.value.path == instances and e.value.line == 2
