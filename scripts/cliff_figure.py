"""The combined truncation figure (like the paper's Figure 5): one panel per data set, one curve per
model, baseline and cliff layer marked; prints every run's cliff layer.

    python scripts/cliff_figure.py --runs outputs/eval --out outputs/eval/cliffs.png
    python scripts/cliff_figure.py --runs outputs/eval/7b/pope-all,outputs/eval/7b/textvqa-all --epsilon 0.005

--runs takes run directories of scripts/evaluate.py, or folders holding them (searched recursively for
summary.json). See docs/evaluation.md for the cliff-layer definition.
"""
import sys

from absl import flags

from jaxflow.cli import run

flags.DEFINE_list("runs", None, "comma-separated run directories (or folders holding them)")
flags.DEFINE_string("out", "outputs/eval/cliffs.png", "the PNG to write")
flags.DEFINE_float("epsilon", None, "recompute every cliff with this tolerance (default: each run's own)")
flags.DEFINE_string("metric", None, "plot this metric instead of each data set's primary one (e.g. accuracy)")
FLAGS = flags.FLAGS


def main(argv):
    if not FLAGS.runs:
        print("error: --runs is required (run directories of scripts/evaluate.py)", file=sys.stderr)
        sys.exit(2)
    from jaxflow.evaluation import EvaluationError, cliff_figure

    if FLAGS.epsilon is not None and FLAGS.epsilon < 0:
        print(f"error: --epsilon must be >= 0, got {FLAGS.epsilon}", file=sys.stderr)
        sys.exit(2)
    try:
        res = cliff_figure(FLAGS.runs, FLAGS.out, epsilon=FLAGS.epsilon, metric=FLAGS.metric)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for ds, model, k in res["cliffs"]:
        print(f"{ds:10s} {model:24s} cliff layer {k}")
    print(f"wrote {res['path']}")


if __name__ == "__main__":
    run(main)
