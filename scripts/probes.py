"""Per-layer linear probes: at which layer is the answer (and, on the toy sets, what is in the image)
linearly readable from the residual stream at the last prompt token? Held-out accuracy per layer with
95% Wilson intervals, against the truncation cliff layer of the same items.

Offline, on the embedded toy model and a generated held-out toy POPE set (docs/probes.md):
    python scripts/probes.py
A real run:
    python scripts/probes.py --checkpoint checkpoints/llava-1.5-7b --dataset pope \\
        --data_dir data/pope --image_dir data/coco/val2014 --batch_size 16 --out outputs/probes/pope
Outputs (in --out): probes.json (accuracy and interval per probe and layer, the truncation curve and
its cliff layer, the settings), probes.png (accuracy against layer, cliff marked), features.npz (the
features (N, L+1, D), the labels, the split); the generated data under toy_data/ (or the bundled
fixtures under fixtures/) when no --data_dir is given. Everything is `jaxflow.analysis.probes.run_probes`.
"""
import sys

from absl import flags, logging

from jaxflow.cli import mesh_from_flags, run
from jaxflow.data.prompts import TEMPLATES

flags.DEFINE_enum("dataset", "toy_pope", ["pope", "textvqa", "scienceqa", "chair", "toy_pope", "toy_caption"],
                  "the data set (toy_pope / toy_caption: generated held-out toy shapes sets when no --data_dir)")
flags.DEFINE_string("checkpoint", None, "jaxflow checkpoint directory (default: the embedded toy model, "
                    "jaxflow/assets/toy_llava)")
flags.DEFINE_string("data_dir", None, "the data set's annotation files (default: generated toy data / the bundled "
                    "fixtures)")
flags.DEFINE_string("image_dir", None, "the image folder (required with --data_dir)")
flags.DEFINE_string("out", None, "output folder (default: outputs/probes/{model}/{dataset})")
flags.DEFINE_integer("limit", None, "only the first N items")
flags.DEFINE_integer("toy_n", 100, "toy sets without --data_dir: questions per POPE split / images generated")
flags.DEFINE_integer("seed", 0, "toy sets: seed of the generated data; chair: seed of the image sample")
flags.DEFINE_string("pope_splits", None, "pope / toy_pope: comma-separated categories (default: all found)")
flags.DEFINE_integer("batch_size", 16, "rows per forward")
flags.DEFINE_float("train_fraction", 0.5, "share of the images whose items train the probes (the rest: held out)")
flags.DEFINE_integer("steps", 500, "full-batch Adam steps")
flags.DEFINE_float("lr", 0.1, "peak learning rate (cosine decay)")
flags.DEFINE_float("weight_decay", 1e-3, "L2 penalty weight_decay/2 * ||w||^2 on standardised features")
flags.DEFINE_integer("probe_seed", 0, "seed of the train/test split")
flags.DEFINE_bool("cliff", True, "decode every item under every cut layer K (as evaluate.py --sweep all) and mark "
                  "the truncation cliff layer of the same items")
flags.DEFINE_float("epsilon", 0.01, "cliff-layer tolerance (as evaluate.py)")
flags.DEFINE_integer("max_new_tokens", None, "answer length limit of the truncated decoding (default: the data "
                     "set's, as evaluate.py)")
flags.DEFINE_enum("template", None, list(TEMPLATES), "prompt template (default: the checkpoint's own)")
flags.DEFINE_bool("pad_square", False, "LLaVA only: pad images to a square with the mean colour")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "cast the checkpoint to this dtype (default: as stored)")
flags.DEFINE_bool("overwrite", False, "write into an --out that holds files jaxflow did not write "
                  "(they are kept: only jaxflow's own outputs are replaced)")
FLAGS = flags.FLAGS


def main(argv):
    logging.set_verbosity(logging.WARNING)
    import os

    from jaxflow.analysis.probes import ProbeError, run_probes
    from jaxflow.pipeline import checkpoint_name

    out = FLAGS.out or os.path.join("outputs", "probes", checkpoint_name(FLAGS.checkpoint), FLAGS.dataset)
    options = {}
    if FLAGS.pope_splits:
        if FLAGS.dataset not in ("pope", "toy_pope"):
            print("error: --pope_splits applies to --dataset pope or toy_pope", file=sys.stderr)
            sys.exit(2)
        options["splits"] = tuple(s.strip() for s in FLAGS.pope_splits.split(",") if s.strip())
    try:
        r = run_probes(FLAGS.checkpoint, FLAGS.dataset, out=out, data_dir=FLAGS.data_dir, image_dir=FLAGS.image_dir,
                       mesh=mesh_from_flags(), rules=FLAGS.sharding,
                       limit=FLAGS.limit, toy_n=FLAGS.toy_n, seed=FLAGS.seed, options=options,
                       batch_size=FLAGS.batch_size, train_fraction=FLAGS.train_fraction, steps=FLAGS.steps,
                       lr=FLAGS.lr, weight_decay=FLAGS.weight_decay, probe_seed=FLAGS.probe_seed, cliff=FLAGS.cliff,
                       epsilon=FLAGS.epsilon, max_new_tokens=FLAGS.max_new_tokens, template=FLAGS.template,
                       pad_square=FLAGS.pad_square, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite,
                       progress=lambda msg: print(msg, flush=True))
    except ProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_summary(r.summary)
    print("wrote " + ", ".join(r.files.values()))


def print_summary(s):
    """Held-out accuracy per probe and layer, chance, the truncation curve and its cliff."""
    L = s["num_layers"]
    print(f"{s['model']} on {s['dataset']}: {s['n_items']} items, {s['split']['n_test']} held out; "
          f"held-out accuracy per layer l (residual entering layer l; l = {L}: the last layer's output)")
    print(f"  {'probe':<16}" + "".join(f"  {'l=' + str(l):>6}" for l in s["layers"]) + "  chance")
    for p in s["probes"]:
        print(f"  {p['name']:<16}" + "".join(f"  {a:6.3f}" for a in p["accuracy"]) + f"  {p['chance']:6.3f}")
    t = s.get("truncation")
    if t is not None:
        print(f"  {'truncation ' + t['primary_metric']:<16}" + "".join(f"  {v:6.3f}" for v in t["primary"])
              + "  (image cut from layer K = l on)")
        print(f"cliff layer: {t['cliff_layer']} (epsilon {t['epsilon']:g})")
    if s.get("model_answer"):
        print(f"the model's own first-token answer: accuracy {s['model_answer']['all']:.3f}")


if __name__ == "__main__":
    run(main)
