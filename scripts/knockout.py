"""Attention knockout (Zhang et al., CVPR 2025): cut the flow Image->Question, Image->Last and
Question->Last in every window of consecutive layers and watch the answer's probability.

    python scripts/knockout.py                                # embedded toy model and bundled image
    python scripts/knockout.py --checkpoint checkpoints/llava-1.5-7b --image cat.jpg \
        --question "Is there a cat in the image?" --window 9 --region 40,60,300,420 --out outputs/knockout

Writes knockout.json, knockout.npz, knockout.png (change of P(answer) against layer, one line per
path) and report.html. All paths and windows run in one compiled program.
"""
import sys

from absl import flags, logging

from jaxflow.cli import mesh_from_flags, run
from jaxflow.data.prompts import TEMPLATES

flags.DEFINE_string("checkpoint", None, "jaxflow checkpoint directory (default: the embedded toy model, jaxflow/assets/toy_llava)")
flags.DEFINE_string("image", None, "image file (default: the bundled demo image)")
flags.DEFINE_string("question", "Is there a red circle in the image?", "the question")
flags.DEFINE_integer("window", None, "layers per knocked-out window (default: 9 of 32 layers, scaled to the model's "
                     "depth; 1 for the 4-layer toy)")
flags.DEFINE_string("region", None, "x0,y0,x1,y1: a box in the image's own pixels (e.g. the asked object's); adds "
                    "the path region->last (the last prompt position does not read the image tokens in the box)")
flags.DEFINE_enum("template", None, list(TEMPLATES), "prompt template (default: the checkpoint's own)")
flags.DEFINE_bool("pad_square", False, "LLaVA only: pad the image to a square with the mean colour")
flags.DEFINE_string("out", "outputs/knockout", "output folder: knockout.json, knockout.npz, knockout.png, report.html")
flags.DEFINE_bool("overwrite", False, "write into an --out that holds files jaxflow did not write "
                  "(they are kept: only jaxflow's own outputs are replaced)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxflow import tiny
    from jaxflow.analysis.knockout_report import run_knockout_report

    try:
        sweep, files = run_knockout_report(FLAGS.checkpoint, FLAGS.image or tiny.DEMO_IMAGE, FLAGS.question,
                                           mesh=mesh_from_flags(), rules=FLAGS.sharding,
                                           out=FLAGS.out, window=FLAGS.window, template=FLAGS.template,
                                           pad_square=FLAGS.pad_square, overwrite=FLAGS.overwrite, region=FLAGS.region,
                                           progress=lambda msg: print(msg, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"P(answer) without knockout: {sweep.base[0]:.4f}; change (%) with the path cut in the window "
          f"of {sweep.window} layer(s) starting at layer:")
    print("  " + f"{'path':16s}" + "".join(f"{int(s):>8d}" for s in sweep.starts))
    for p, name in enumerate(sweep.paths):
        print("  " + f"{name:16s}" + "".join(f"{c:8.1f}" for c in sweep.change[p, :, 0]))
    print(f"wrote {', '.join(files)}")


if __name__ == "__main__":
    run(main)
