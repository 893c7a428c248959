"""Runs a vision-language model (any supported family) on one image and question: greedy answer, token-group
spans, and (unless --noanalyses) every instrument: LLaVA-CAM per layer, attention shares, information flow,
truncation sweep, attention knockout, logit lens. Overlays are drawn on the original image; model_input.png shows what the model sees
(LLaVA, Qwen-VL: the preprocessed image; InternVL: its tiles and thumbnail; Qwen2-VL: its patches).

With no flags it uses the embedded toy model (jaxflow/assets/toy_llava, trained on synthetic shapes)
and the bundled image (no downloads):
    python scripts/demo.py
    python scripts/demo.py --checkpoint checkpoints/llava-1.5-7b --image cat.jpg --question "What is this?"
    python scripts/demo.py --checkpoint checkpoints/internvl3-1b --image cat.jpg --question "What is this?"
"""
import os
import sys

from absl import flags, logging

from jaxflow.cli import mesh_from_flags, run
from jaxflow.data.prompts import TEMPLATES

flags.DEFINE_string("checkpoint", None, "jaxflow checkpoint directory (default: the embedded toy model, jaxflow/assets/toy_llava)")
flags.DEFINE_string("image", None, "image file (default: the bundled demo image)")
flags.DEFINE_string("question", "Is there a red circle in the image?", "the question")
flags.DEFINE_enum("template", None, list(TEMPLATES), "prompt template (default: the checkpoint's own: "
                  "vicuna_v1 for converted LLaVA-1.5, internvl, qwen2_vl, qwen_vl for those families)")
flags.DEFINE_integer("max_new_tokens", 16, "greedy decoding length limit")
flags.DEFINE_bool("pad_square", False, "LLaVA only: pad the image to a square with the mean colour "
                  "(original LLaVA eval)")
flags.DEFINE_bool("analyses", True, "also run LLaVA-CAM, attention shares, flows, the truncation sweep, attention "
                  "knockout and the logit lens")
flags.DEFINE_string("out", "outputs/demo", "output folder: summary.json, model_input.png, analysis/, truncation/, "
                    "knockout/, logit_lens/")
flags.DEFINE_bool("overwrite", False, "write into an --out that holds files jaxflow did not write "
                  "(they are kept: only jaxflow's own outputs are replaced)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxflow import tiny
    from jaxflow.demo import DemoError, run_demo

    try:
        result = run_demo(FLAGS.checkpoint, FLAGS.image or tiny.DEMO_IMAGE, FLAGS.question, out=FLAGS.out,
                          mesh=mesh_from_flags(), rules=FLAGS.sharding,
                          template=FLAGS.template, max_new_tokens=FLAGS.max_new_tokens,
                          pad_square=FLAGS.pad_square, analyses=FLAGS.analyses, overwrite=FLAGS.overwrite)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"model:    {result['model']}")
    print(f"question: {result['question']}")
    print(f"answer:   {result['answer']!r}")
    tiles = result.get("tiles")
    tiled = f" ({tiles['rows']}x{tiles['cols']} tiles{' + thumbnail' if tiles['thumbnail'] else ''})" if tiles else ""
    print(f"image:    {result['num_image_tokens']} image tokens, grid {result['grid'][0]}x{result['grid'][1]}{tiled}")
    print("token groups [start, end) per row (S system, T image, U user, A answer):")
    for g, r in result["spans"][0].items():
        print(f"  {g:7s} {r}")
    if "truncation" in result:
        print(f"truncation: cliff layer {result['truncation']['cliff_layer']}; answers by cut layer K:")
        for k, a in result["truncation"]["answers"].items():
            print(f"  K={k:<3d} {a!r}")
        if "knockout" in result:
            k = result["knockout"]
            print(f"knockout: change (%) of P(answer) with the path cut in windows of {k['window']} layer(s) "
                  f"starting at {k['window_starts']}:")
            for name, ch in k["change_percent"].items():
                print(f"  {name:16s} " + " ".join(f"{c:7.1f}" for c in ch))
        print(f"figures: {result['analysis']}/*.png, {result['truncation']['out']}/sweep.png, "
              f"{result['knockout']['out']}/knockout.png, {result['logit_lens']['out']}/*.png")
    print(f"wrote {os.path.join(result['out'], 'summary.json')} and model_input.png")


if __name__ == "__main__":
    run(main)
