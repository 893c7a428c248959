"""Toy training: the loss falls, and a run resumed from its orbax checkpoint follows the same curve."""
import numpy as np
import pytest

from jaxflow.toy import data as toy_data
from jaxflow.toy.train import TrainConfig, TrainSetupError, train

# the two batch layouts: the shipped recipe's dialogs (the TrainConfig defaults, 4 images a step) and
# single questions with a share rewritten as text
LAYOUTS = {"dialogs": dict(batch_size=4),
           "single": dict(batch_size=8, turns=1, grounding=0.0, question_words=False, align=0.0,
                          text_fraction=0.5)}


def _tc(layout="dialogs", **kw):
    return TrainConfig(**{**dict(steps=12, lr=2e-3, warmup=3, eval_every=1000, eval_size=16, save_every=4),
                          **LAYOUTS[layout], **kw})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loss_falls_and_resume_is_exact(tmp_path, layout):
    tc = _tc(layout)
    full = train(str(tmp_path / "a"), tc, progress=False, log=lambda *_: None)["history"]
    losses = [h["loss"] for h in full]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
    # interrupted after 8 steps (checkpoint at 8), then resumed to 12
    part = train(str(tmp_path / "b"), tc, progress=False, log=lambda *_: None, stop_after=8)
    assert part["steps_done"] == 8
    rest = train(str(tmp_path / "b"), tc, progress=False, log=lambda *_: None)["history"]
    assert [h["step"] for h in rest] == list(range(9, 13))
    np.testing.assert_allclose([h["loss"] for h in part["history"]] + [h["loss"] for h in rest], losses,
                               rtol=1e-5)
    # wall time counts on across the resumption
    assert rest[0]["elapsed_s"] >= part["history"][-1]["elapsed_s"]


def test_setup_errors(tmp_path):
    with pytest.raises(TrainSetupError, match="--text_fraction applies to single questions"):
        train(str(tmp_path / "x"), _tc(text_fraction=0.5), progress=False)
    with pytest.raises(TrainSetupError, match="--question_words applies to dialogs"):
        train(str(tmp_path / "x"), _tc("single", question_words=True), progress=False)
    # a run folder is resumed only with the settings it was trained with (eval/save cadence aside)
    train(str(tmp_path / "r"), _tc(steps=2, save_every=2), progress=False, log=lambda *_: None)
    with pytest.raises(TrainSetupError, match=r"other settings \(lr 0.002 -> 0.001\)"):
        train(str(tmp_path / "r"), _tc(steps=2, save_every=2, lr=1e-3), progress=False)
    with pytest.raises(TrainSetupError, match=r"\(steps 2 -> 1\)"):
        train(str(tmp_path / "r"), _tc(steps=1, save_every=2), progress=False)
    again = train(str(tmp_path / "r"), _tc(steps=2, save_every=1, eval_every=5), progress=False, log=lambda *_: None)
    assert again["steps_done"] == 2 and again["history"] == []


def test_toy_data_is_deterministic_and_well_formed():
    a = toy_data.examples(3, 7, 20)
    b = toy_data.examples(3, 7, 20)
    assert [e.question for e in a] == [e.question for e in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    for e in toy_data.examples(1, 0, 200):
        present = {(o.color, o.shape) for o in e.objects}
        if e.kind == "existence":
            words = e.question.split()
            pair = (words[3], words[4])
            assert (e.answer == "Yes") == (pair in present)
            if e.split == "adversarial" and e.answer == "No":
                assert any(pair[0] == c or pair[1] == s for c, s in present)
        if e.kind == "caption":
            assert e.answer.count(" a ") + e.answer.startswith("a ") == len(e.objects)
        for o in e.objects:  # boxes inside the image, objects apart
            assert 0 <= o.box[0] < o.box[2] <= toy_data.IMAGE_SIZE and 0 <= o.box[1] < o.box[3] <= toy_data.IMAGE_SIZE


def test_dialog_batch_supervises_answers_and_question_words():
    from jaxflow.data.tiny_tokenizer import build_tiny_tokenizer
    from jaxflow.toy.train import LENGTH_BUCKET, make_dialog_batch, toy_config

    tok, cfg = build_tiny_tokenizer(), toy_config()
    dialogs = toy_data.dialogs(0, 0, 3, 4)
    for qw in (False, True):
        b = make_dialog_batch(dialogs, tok, cfg, question_words=qw)
        assert b["input_ids"].shape[1] % LENGTH_BUCKET == 0
        for r, d in enumerate(dialogs):
            ids = b["input_ids"][r]
            assert (ids == cfg.image_token_id).sum() == cfg.num_image_tokens
            sup = tok.convert_ids_to_tokens([int(t) for t in ids[b["loss_mask"][r]]])
            want = []
            for q, a, kind in d.turns:
                if qw and kind == "existence" and a == "Yes":
                    want += q.split()[3:5]  # "Is there a <colour> <shape> in the image?"
                want += tok.convert_ids_to_tokens(tok(a, add_special_tokens=False).input_ids) + ["</s>"]
            assert sup == want
            # the first turn is laid out exactly as a single question
            first = tok.convert_ids_to_tokens([int(t) for t in ids if t != cfg.image_token_id])
            assert first[:3] == ["<s>", "USER", ":"]


def test_patch_targets_cover_the_object_cells():
    from jaxflow.data.tiny_tokenizer import build_tiny_tokenizer
    from jaxflow.toy.train import patch_targets, toy_config

    tok, cfg = build_tiny_tokenizer(), toy_config()
    obj = toy_data.ToyObject("red", "circle", (14, 28, 42, 49))  # cell centres x 21, 35; y 35 (49 excluded)
    t = patch_targets([[obj]], tok, cfg)
    cells = np.flatnonzero(t["patch_mask"][0])
    assert cells.tolist() == [2 * 8 + 1, 2 * 8 + 2]
    red, circle = tok("red circle", add_special_tokens=False).input_ids
    assert t["patch_words"][0, cells].tolist() == [[red, circle]] * 2


def test_described_rewrites_a_share_as_text_and_masks_its_patches():
    from jaxflow.data.tiny_tokenizer import build_tiny_tokenizer
    from jaxflow.toy.train import described, make_batch, toy_config

    exs = toy_data.examples(0, 0, 40, kind="existence")
    out, is_text = described(exs, 0.5, np.random.default_rng(0))
    assert 10 < is_text.sum() < 30
    for e, o, t in zip(exs, out, is_text):
        if t:
            assert o.question == f"{toy_data.caption(e.objects)} . {e.question}" and o.answer == e.answer
            assert np.unique(np.asarray(o.image).reshape(-1, 3), axis=0).shape[0] == 1  # a blank image
        else:
            assert o is e
    b = make_batch(out, build_tiny_tokenizer(), toy_config(), is_text)
    assert not b["patch_mask"][is_text].any() and b["patch_mask"][~is_text].any()


def test_a_failing_batch_raises_instead_of_hanging():
    import pytest

    from jaxflow.toy.train import _Prefetch

    def bad(step):
        if step == 2:
            raise ValueError("broken batch")
        return step

    fetch = _Prefetch(bad, 0, 5)
    assert [fetch.get(), fetch.get()] == [0, 1]
    with pytest.raises(ValueError, match="broken batch"):
        fetch.get()
