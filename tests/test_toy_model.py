"""The shipped toy LLaVA (jaxflow/assets/toy_llava), the default of every script: it answers held-out
existence questions, its Grad-CAM points at the asked object, and cutting the image out of attention
from layer 0 leaves it at chance while the uncut model keeps its accuracy (a real cliff)."""
import numpy as np
import pytest

from jaxflow.pipeline import DEFAULT_MODEL_NAME, answer, load_bundle
from jaxflow.toy import data as toy_data

# Measured on the shipped model (docs/toy.md): held-out existence 0.955-0.967 on three sets of 600,
# 0.970 on this test's 300; gradcam's best layer points into the asked object's box on 0.289 of the 128
# samples below against a chance level of 0.073 (margin 0.216; 0.285 vs 0.075 on 200 other samples);
# the toy POPE sweep of the test below gives accuracy 0.44 / 0.75 / 0.94 / 0.93 / 0.97 for K = 0..4.
TARGET = 0.95
POINTING_MARGIN = 0.15  # the measured 0.216 less about 1.7 binomial standard errors (0.04 at n = 128)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(None)


def test_default_model_is_the_trained_toy(bundle):
    assert bundle.name == DEFAULT_MODEL_NAME == "toy-llava"
    assert bundle.template == "llava_hf"
    assert bundle.config.num_image_tokens == 64 and bundle.config.vision.image_size == toy_data.IMAGE_SIZE


def test_held_out_existence_accuracy(bundle):
    from jaxflow.toy.sets import toy_pope_examples

    # 100 questions per POPE split from the toy POPE set's seed space, which training never draws
    exs = [e for split in toy_data.POPE_SPLITS for e in toy_pope_examples(100, seed=5)[split]]
    got = []
    for i in range(0, len(exs), 50):
        chunk = exs[i:i + 50]
        got += answer(bundle, [e.image for e in chunk], [e.question for e in chunk], max_new_tokens=2).texts
    assert set(got) <= {"Yes", "No"}, sorted(set(got))
    gold = np.array([e.answer for e in exs])
    acc = float((np.array(got) == gold).mean())
    per_split = {s: float((np.array(got) == gold)[[e.split == s for e in exs]].mean()) for s in toy_data.POPE_SPLITS}
    assert acc >= TARGET, (acc, per_split)
    # balanced labels: a constant answer would score 0.5; both answers are used
    assert 0.4 < np.mean(np.array(got) == "Yes") < 0.6


def test_gradcam_points_at_the_object(bundle):
    """Pointing game: the cell of a sample's largest gradcam value lies in the asked object's box. The
    chance level is the share of grid cells whose centre lies in the box (objects cover 2-3 x 2-3 of
    the 8 x 8 cells, so about 0.07). Layer L - 1 is zero by construction (nothing after it reads the
    image positions); the best layer is 2."""
    from jaxflow.analysis.faithfulness import faithfulness
    from jaxflow.toy.sets import faithfulness_samples

    res = faithfulness(bundle, faithfulness_samples(128, seed=3), methods=("gradcam",))
    best = res.pointing["gradcam"][res.best_layer("gradcam")]
    assert res.chance_pointing < 0.15
    assert best - res.chance_pointing >= POINTING_MARGIN, (res.pointing["gradcam"], res.chance_pointing)


def test_toy_pope_sweep_has_a_real_cliff(tmp_path, bundle):
    """Cutting image keys from layer K on: K = 0 (no layer sees the image) answers at chance on the
    balanced toy POPE questions; K = L (nothing cut) keeps the model's accuracy."""
    from jaxflow.evaluation.cliff import cliff_layer
    from jaxflow.evaluation.runner import EvalConfig, run_evaluation

    cfg = EvalConfig(dataset="toy_pope", out=str(tmp_path / "run"), options={"n": 60}, seed=4, batch_size=30,
                     progress=False)
    res = run_evaluation(cfg, bundle=bundle)
    acc = {r["K"]: r["metrics"]["accuracy"] for r in res.summary["per_layer"]}
    L = bundle.config.text.num_layers
    assert sorted(acc) == list(range(L + 1))
    assert abs(acc[0] - 0.5) <= 0.1, acc  # 180 questions: one standard error is 0.037
    assert acc[L] >= TARGET, acc
    # the image is read in the first layers: cutting it from layer 2 on costs little, from layer 1 on a lot
    assert acc[2] >= acc[L] - 0.06 and acc[1] <= acc[L] - 0.1, acc
    assert cliff_layer(sorted(acc), [acc[k] for k in sorted(acc)], 0.05) == 2


def test_missing_embedded_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    import jaxflow.toy
    from jaxflow.convert import CheckpointError

    monkeypatch.setattr(jaxflow.toy, "TOY_CHECKPOINT", str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="embedded toy checkpoint is missing"):
        load_bundle(None)
