"""The logit lens on one image and question: what each layer's residual stream would predict, read
through the final norm and the unembedding. Follows the answer's first token through the layers at the
last prompt position, and shows what each image token "means" (its top word) on the image grid.

    python scripts/logit_lens.py                      # embedded toy model and bundled image
    python scripts/logit_lens.py --checkpoint checkpoints/llava-1.5-7b --image cat.jpg \\
        --question "Is there a cat in the image?" --layers 0,8,16,24,32 --out outputs/lens

Writes answer_lens.png, image_tokens.png, lens.npz and summary.json into --out (see docs/logit_lens.md).
"""
import sys

from absl import flags, logging

from jaxflow.cli import mesh_from_flags, run
from jaxflow.data.prompts import TEMPLATES

flags.DEFINE_string("checkpoint", None, "jaxflow checkpoint directory (default: the embedded toy model, jaxflow/assets/toy_llava)")
flags.DEFINE_string("image", None, "image file (default: the bundled demo image)")
flags.DEFINE_string("question", "Is there a red circle in the image?", "the question")
flags.DEFINE_string("answer", None, "the answer whose first token is followed; default: the model's greedy answer")
flags.DEFINE_integer("top_k", 5, "top tokens kept per layer and position (lens.npz, summary.json)")
flags.DEFINE_list("layers", None, "lens layers of the image-token figure, 0..L (L = the last layer's output); "
                  "default: four evenly spaced")
flags.DEFINE_integer("max_new_tokens", 8, "greedy decoding length limit when no --answer is given")
flags.DEFINE_enum("template", None, list(TEMPLATES), "prompt template (default: the checkpoint's own: "
                  "vicuna_v1 for converted LLaVA-1.5, internvl for InternVL)")
flags.DEFINE_bool("pad_square", False, "LLaVA only: pad the image to a square with the mean colour "
                  "(original LLaVA eval)")
flags.DEFINE_string("out", "outputs/logit_lens", "output folder: answer_lens.png, image_tokens.png, lens.npz, "
                    "summary.json")
flags.DEFINE_bool("overwrite", False, "write into an --out that holds files jaxflow did not write "
                  "(they are kept: only jaxflow's own outputs are replaced)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxflow import tiny
    from jaxflow.analysis.logit_lens import run_logit_lens

    try:
        report, s, files = run_logit_lens(
            FLAGS.checkpoint, FLAGS.image or tiny.DEMO_IMAGE, FLAGS.question, out=FLAGS.out, answer=FLAGS.answer,
            mesh=mesh_from_flags(), rules=FLAGS.sharding,
            top_k=FLAGS.top_k, layers=FLAGS.layers, max_new_tokens=FLAGS.max_new_tokens, template=FLAGS.template,
            pad_square=FLAGS.pad_square, overwrite=FLAGS.overwrite, progress=lambda msg: print(msg, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"model:    {s['model']}")
    print(f"question: {s['question']}")
    print(f"answer:   {s['answer']!r} ({'given' if s['answer_given'] else 'greedy'}); followed token "
          f"{s['first_token']['token']!r} (id {s['first_token']['id']}) at position {s['last_position']}")
    print("layer  rank  P(answer token)  lens top-1")
    for l, (r, p, top) in enumerate(zip(s["answer_rank"], s["answer_probability"], s["top_tokens"])):
        print(f"{l:5d}  {r:4d}  {p:15.4f}  {top[0]['token']!r} ({top[0]['probability']:.3f})")
    first = s["first_layer_top1"]
    print(f"the answer token is the lens's top-1 from layer {first} on" if first is not None and
          all(r == 0 for r in s["answer_rank"][first:]) else
          f"the answer token is first the lens's top-1 at layer {first}" if first is not None else
          "the answer token is never the lens's top-1")
    for l in s["image_tokens"]["shown_layers"]:
        words = ", ".join(f"{w['token']!r} x{w['count']}" for w in s["image_tokens"]["top_words"][str(l)][:5])
        print(f"image tokens, layer {l}: {words}")
    print(f"wrote {', '.join(files)}")


if __name__ == "__main__":
    run(main)
