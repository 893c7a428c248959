"""Answer one question about one image with the image cut out of attention from layer K on, for
every K at once; plot the answer's probability against K with the cliff layer marked.

    python scripts/truncation_sweep.py                       # embedded toy model and bundled image
    python scripts/truncation_sweep.py --checkpoint checkpoints/llava-1.5-7b --image cat.jpg \
        --question "Is there a cat in the image?" --max_new_tokens 8 --out outputs/sweep
    python scripts/truncation_sweep.py --images photos/ --question "Is there a cat?"   # every image in a folder
    python scripts/truncation_sweep.py --images items.jsonl --batch_size 4   # {"image": ..., "question": ...} per line

Writes answers.json, sweep.png and report.html (one self-contained page: the per-K table, the figure, the
settings, the model, the prompt as tokenised); with --images, answers.json and sweep.png per item in
OUT/<index>_<image stem>/ and one report.html and items.json in OUT.
"""
import math
import sys

from absl import flags, logging

from jaxflow.cli import mesh_from_flags, run
from jaxflow.data.prompts import TEMPLATES

flags.DEFINE_string("checkpoint", None, "jaxflow checkpoint directory (default: the embedded toy model, jaxflow/assets/toy_llava)")
flags.DEFINE_string("image", None, "image file (default: the bundled demo image)")
flags.DEFINE_string("images", None, "several images: a folder (every image file in it, sorted, each with --question) "
                    "or a JSON-lines file of {\"image\": path, \"question\": text} lines (relative paths from the "
                    "file's folder)")
flags.DEFINE_integer("batch_size", 8, "with --images: items per batch")
flags.DEFINE_string("question", "Is there a red circle in the image?", "the question")
flags.DEFINE_enum("template", None, list(TEMPLATES), "prompt template (default: the checkpoint's own: "
                  "vicuna_v1 for converted LLaVA-1.5, internvl for InternVL)")
flags.DEFINE_integer("max_new_tokens", 16, "greedy decoding length limit for every K")
flags.DEFINE_list("layers", None, "cut layers K to evaluate (default: all of 0..L)")
flags.DEFINE_integer("keep_top_k", 0, "FastV-style: keep this many image tokens from layer K on")
flags.DEFINE_float("epsilon", 0.05, "cliff: smallest K after which P(first answer token) stays within "
                   "epsilon of its value at K = L")
flags.DEFINE_bool("pad_square", False, "LLaVA only: pad the image to a square with the mean colour "
                  "(original LLaVA eval)")
flags.DEFINE_string("out", "outputs/truncation_sweep", "output folder: answers.json, sweep.png, report.html")
flags.DEFINE_bool("overwrite", False, "write into an --out that holds files jaxflow did not write "
                  "(they are kept: only jaxflow's own outputs are replaced)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxflow import tiny
    from jaxflow.analysis.sweep_report import run_sweep_report

    if FLAGS.image and FLAGS.images:
        print("error: --image and --images are mutually exclusive: pass one", file=sys.stderr)
        sys.exit(2)
    image = None if FLAGS.images else (FLAGS.image or tiny.DEMO_IMAGE)
    try:
        report, files = run_sweep_report(
            FLAGS.checkpoint, image, FLAGS.question, out=FLAGS.out, items=FLAGS.images, batch_size=FLAGS.batch_size,
            mesh=mesh_from_flags(), rules=FLAGS.sharding,
            template=FLAGS.template, max_new_tokens=FLAGS.max_new_tokens, layers=FLAGS.layers,
            keep_top_k=FLAGS.keep_top_k, epsilon=FLAGS.epsilon, pad_square=FLAGS.pad_square, overwrite=FLAGS.overwrite,
            progress=lambda msg: print(msg, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for i, rep in enumerate(report if FLAGS.images else [report]):
        if FLAGS.images:
            print(f"item {i}:")
        _print(rep)
    print(f"wrote {', '.join(files)}")


def _print(report):
    width = max(len(str(k)) for k in report.layers)
    print(f"untruncated answer: {report.reference_answer!r}")
    print(f"{'K':>{width}}  P(1st tok)  P(answer)  margin  answer under K")
    for k, lp1, lp, m, a in zip(report.layers, report.first_token_logprob, report.answer_logprob,
                                report.first_token_margin, report.answers):
        print(f"{k:>{width}}  {math.exp(lp1):10.4f}  {math.exp(lp):9.4f}  {m:6.2f}  {a!r}")
    print(f"cliff layer: {report.cliff} (epsilon {FLAGS.epsilon})")


if __name__ == "__main__":
    run(main)
