"""The paper's instruments on one image and question: LLaVA-CAM (every layer, per answer token),
attention shares of S / T / U, image attention and information-flow saliency; figures + arrays.

With no flags it runs on the embedded toy model (jaxflow/assets/toy_llava, trained on synthetic shapes)
and the bundled image (no downloads):
    python scripts/analyze.py
    python scripts/analyze.py --checkpoint checkpoints/llava-1.5-7b --image cat.jpg \\
        --question "Is there a cat in the image?" --methods paper,gradcam --smooth_n 8 --out outputs/cat
    python scripts/analyze.py --checkpoint checkpoints/internvl3-1b --image cat.jpg --question "Is there a cat?"
    python scripts/analyze.py --images photos/ --question "Is there a cat?"      # every image in a folder
    python scripts/analyze.py --images items.jsonl --batch_size 4   # {"image": ..., "question": ...} per line
Without --answer the model's greedy answer is generated first and then teacher-forced.
Outputs (in --out): cam_{method}.png, cam_{method}_tokens.png, attention_shares.png,
attention_layer{K}.png, image_attention.png, flows.png, model_input.png, arrays.npz, summary.json and
report.html (one self-contained page: figures, tables, settings, model, the prompt as tokenised). With
--images: those files per item in OUT/<index>_<image stem>/, and one report.html and items.json in OUT.
Overlays are drawn on the original image (LLaVA: over the part the centre crop keeps, or the padded
square with --pad_square; InternVL: over the whole image, its tiles' grids stitched); model_input.png is
what the model sees (LLaVA: the preprocessed image; InternVL: the tiles and the thumbnail).
"""
import os
import sys

from absl import flags, logging

from jaxflow.cli import mesh_from_flags, run
from jaxflow.data.prompts import TEMPLATES

flags.DEFINE_string("checkpoint", None, "jaxflow checkpoint directory (default: the embedded toy model, jaxflow/assets/toy_llava)")
flags.DEFINE_string("image", None, "image file (default: the bundled demo image)")
flags.DEFINE_string("images", None, "several images: a folder (every image file in it, sorted, each with --question) "
                    "or a JSON-lines file of {\"image\": path, \"question\": text} lines (relative paths from the "
                    "file's folder; an optional \"answer\" is explained instead of the greedy one)")
flags.DEFINE_integer("batch_size", 8, "with --images: items per forward/backward batch")
flags.DEFINE_string("question", "Is there a red circle in the image?", "the question")
flags.DEFINE_string("answer", None, "answer to explain (teacher-forced); default: the model's greedy answer")
flags.DEFINE_list("methods", ["paper", "gradcam"], "CAM methods, comma-separated: paper, gradcam, gradxact")
flags.DEFINE_integer("smooth_n", 0, "SmoothGrad: number of noisy copies of the image (0 = off)")
flags.DEFINE_float("smooth_sigma", 0.15, "SmoothGrad: noise std on the [0, 1] image")
flags.DEFINE_float("threshold", None, "zero CAM values below this (after normalisation; the paper uses 0.5)")
flags.DEFINE_enum("score", "logit", ["logit", "logprob"], "target: sum of the answer tokens' logits or log-probs")
flags.DEFINE_enum("heads", "mean", ["mean", "max"], "attention shares: average or maximum over heads")
flags.DEFINE_enum("queries", "predicting", ["predicting", "answer"],
                  "attention queries: the positions that predict the answer tokens (last prompt token and the "
                  "answer but its last token), or the answer tokens themselves")
flags.DEFINE_integer("layer", None, "layer of the attention heat map (default: the largest image share)")
flags.DEFINE_enum("template", None, list(TEMPLATES), "prompt template (default: the checkpoint's own: "
                  "vicuna_v1 for converted LLaVA-1.5, internvl for InternVL)")
flags.DEFINE_integer("max_new_tokens", 8, "greedy decoding length limit when no --answer is given")
flags.DEFINE_integer("max_token_maps", 8, "per-token CAM figure: at most this many answer tokens")
flags.DEFINE_bool("pad_square", False, "LLaVA only: pad the image to a square with the mean colour "
                  "(original LLaVA eval)")
flags.DEFINE_integer("seed", 0, "SmoothGrad noise seed")
flags.DEFINE_string("out", "outputs/analyze", "output folder")
flags.DEFINE_bool("overwrite", False, "write into an --out that holds files jaxflow did not write "
                  "(they are kept: only jaxflow's own outputs are replaced)")
FLAGS = flags.FLAGS


def main(argv):
    logging.set_verbosity(logging.WARNING)
    from jaxflow import tiny
    from jaxflow.viz.report import AnalyzeError, run_analysis

    if FLAGS.image and FLAGS.images:
        print("error: --image and --images are mutually exclusive: pass one", file=sys.stderr)
        sys.exit(2)
    image = None if FLAGS.images else (FLAGS.image or tiny.DEMO_IMAGE)
    try:
        s = run_analysis(FLAGS.checkpoint, image, FLAGS.question, out=FLAGS.out, items=FLAGS.images,
                         mesh=mesh_from_flags(), rules=FLAGS.sharding,
                         batch_size=FLAGS.batch_size,
                         answer=FLAGS.answer, methods=tuple(m.strip() for m in FLAGS.methods if m.strip()),
                         smooth_n=FLAGS.smooth_n, smooth_sigma=FLAGS.smooth_sigma, threshold=FLAGS.threshold,
                         score=FLAGS.score, template=FLAGS.template, max_new_tokens=FLAGS.max_new_tokens,
                         pad_square=FLAGS.pad_square, heads=FLAGS.heads, queries=FLAGS.queries, layer=FLAGS.layer,
                         max_token_maps=FLAGS.max_token_maps, seed=FLAGS.seed, overwrite=FLAGS.overwrite,
                         progress=lambda msg: print(msg, flush=True))
    except AnalyzeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.images:
        print("item                      max T share (layer)  answer")
        for item in s["items"]:
            t = item["attention_shares"]["T"]
            best = max(range(len(t)), key=t.__getitem__)
            print(f"{os.path.basename(item['out']):24.24}  {t[best]:11.3f} ({best:3d})   {item['answer']!r}")
        print(f"wrote {len(s['items'])} item folders, report.html and items.json to {s['out']}")
        return
    shares = s["attention_shares"]
    print(f"model:    {s['model']}")
    print(f"question: {s['question']}")
    print(f"answer:   {s['answer']!r} ({len(s['answer_ids'])} tokens{'' if s['answer_given'] else ', greedy'})")
    print("layer  share S  share T  share U   flow T->A")
    for l in range(s["num_layers"]):
        print(f"{l:5d}  {shares['S'][l]:7.3f}  {shares['T'][l]:7.3f}  {shares['U'][l]:7.3f}  "
              f"{s['flows']['T->A'][l]:10.3e}")
    print(f"wrote {len(s['files'])} files to {os.path.abspath(s['out'])}: {', '.join(s['files'])}")


if __name__ == "__main__":
    run(main)
