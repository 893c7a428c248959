"""Toy training: the loss falls, and a run resumed from its orbax checkpoint follows the same curve."""
import numpy as np

from jaxflow.toy import data as toy_data
from jaxflow.toy.train import TrainConfig, train


def _tc(**kw):
    return TrainConfig(**{**dict(steps=12, batch_size=8, lr=2e-3, warmup=3, eval_every=1000, eval_size=16,
                                 save_every=4), **kw})


def test_loss_falls_and_resume_is_exact(tmp_path):
    full = train(str(tmp_path / "a"), _tc(), progress=False, log=lambda *_: None)["history"]
    losses = [h["loss"] for h in full]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
    # interrupted after 8 steps (checkpoint at 8), then resumed to 12
    part = train(str(tmp_path / "b"), _tc(), progress=False, log=lambda *_: None, stop_after=8)
    assert part["steps_done"] == 8
    rest = train(str(tmp_path / "b"), _tc(), progress=False, log=lambda *_: None)["history"]
    assert [h["step"] for h in rest] == list(range(9, 13))
    np.testing.assert_allclose([h["loss"] for h in part["history"]] + [h["loss"] for h in rest], losses,
                               rtol=1e-5)


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
