"""Do the LLaVA-CAM heat maps point at the object the answer is about? The pointing game and the
energy-in-box share, per decoder layer and CAM method, with a table and per-layer curves.

    python scripts/faithfulness.py                           # embedded toy model, 200 held-out toy samples
    python scripts/faithfulness.py --checkpoint checkpoints/llava-1.5-7b --boxes my_boxes.jsonl

A boxes file has one JSON object per line: {"image": ..., "question": ..., "box": [x0, y0, x1, y1],
"answer": ... (optional)}, the box in the image's own pixels (e.g. a COCO instance's bbox converted to
corners). Deletion curves (--deletion_steps): each layer's map ranks the image tokens, knocked out of
attention top first; the area under the answer's probability curve per method and layer, against a
random order. Writes summary.json, per_sample.npz, faithfulness.png, deletion.png and report.html (one self-contained page:
the per-layer table, the figure, the settings, the model, an example prompt as tokenised and the words the
tokenizer does not know). See docs/analysis.md.
"""
import sys

from absl import flags, logging

from jaxflow.cli import mesh_from_flags, run
from jaxflow.data.prompts import TEMPLATES

flags.DEFINE_string("checkpoint", None, "jaxflow checkpoint directory (default: the embedded toy model, jaxflow/assets/toy_llava)")
flags.DEFINE_string("boxes", None, "JSON-lines file of your own samples with boxes (default: held-out toy samples)")
flags.DEFINE_string("image_dir", None, "folder of the --boxes images (default: the boxes file's folder)")
flags.DEFINE_integer("n", 200, "toy samples (without --boxes)")
flags.DEFINE_integer("seed", 0, "seed of the toy samples")
flags.DEFINE_list("methods", ["paper", "gradcam", "gradxact"], "CAM methods: paper, gradcam, gradxact")
flags.DEFINE_integer("batch_size", 16, "samples per forward/backward pass")
flags.DEFINE_enum("template", None, list(TEMPLATES), "prompt template (default: the checkpoint's own: "
                  "vicuna_v1 for converted LLaVA-1.5, internvl for InternVL)")
flags.DEFINE_bool("pad_square", False, "LLaVA only: pad images to a square with the mean colour "
                  "(original LLaVA eval)")
flags.DEFINE_integer("deletion_steps", 20, "deletion curves: knock out each map's top image tokens in this many "
                     "equal steps (0: no deletion curves; LLaVA-style patch grids)")
flags.DEFINE_enum("deletion_queries", "answer", ["answer", "text"], "deletion curves: knock the tokens out for the "
                  "answer-predicting positions, or for every position after the image (models that read the image "
                  "into the question first, like the toy)")
flags.DEFINE_string("out", "outputs/faithfulness", "output folder: summary.json, per_sample.npz, faithfulness.png, "
                    "report.html")
flags.DEFINE_bool("overwrite", False, "write into an --out that holds files jaxflow did not write "
                  "(they are kept: only jaxflow's own outputs are replaced)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxflow.analysis.faithfulness import run_faithfulness

    try:
        result, files = run_faithfulness(FLAGS.checkpoint, out=FLAGS.out, n=FLAGS.n, seed=FLAGS.seed,
                                         mesh=mesh_from_flags(), rules=FLAGS.sharding,
                                         methods=FLAGS.methods, boxes=FLAGS.boxes, image_dir=FLAGS.image_dir,
                                         batch_size=FLAGS.batch_size, pad_square=FLAGS.pad_square,
                                         template=FLAGS.template, overwrite=FLAGS.overwrite,
                                         deletion_steps=FLAGS.deletion_steps,
                                         deletion_queries=FLAGS.deletion_queries)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("pointing game (PG) and energy-in-box share (EiB) per decoder layer")
    print(result.table())
    for m in result.methods:
        best = result.best_layer(m)
        print(f"{m}: best layer {best}, pointing {result.pointing[m][best]:.3f} "
              f"(chance {result.chance_pointing:.3f}), energy {result.energy[m][best]:.3f}")
    if result.deletion is not None:
        d = result.deletion
        print(f"deletion curves ({d['queries']} queries): area per layer (random order {d['auc_random']:.3f})")
        for m in result.methods:
            print(f"  {m:10s} " + " ".join(f"{v:.3f}" for v in d["auc"][m])
                  + f"   best layer {result.deletion_best_layer(m)}")
    for msg in result.zero_notes():
        print(f"note: {msg}")
    print(f"wrote {', '.join(files)}")


if __name__ == "__main__":
    run(main)
