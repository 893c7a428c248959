"""Evaluates a model of any supported family (LLaVA, InternVL, Qwen2-VL, Qwen2.5-VL, Qwen-VL) on POPE, TextVQA, ScienceQA-IMG or CHAIR (or the toy shapes sets) under
truncation: every cut layer K in one pass, per-item predictions as it goes (resumable), summary, CSV,
figure and cliff layer.

Offline, on the embedded toy model: a generated held-out toy set (toy POPE / toy captions, see
docs/toy.md), where accuracy falls from the model's (K = L) to chance (K = 0):
    python scripts/evaluate.py --dataset toy_pope
or the bundled fixtures of a benchmark's file format (the toy model knows nothing of COCO):
    python scripts/evaluate.py --dataset pope
A real run:
    python scripts/evaluate.py --checkpoint checkpoints/llava-1.5-7b --dataset pope \\
        --data_dir data/pope --image_dir data/coco/val2014 --sweep all --batch_size 16 --out outputs/eval/pope
Re-running the same command resumes. --mesh data:N,model:M shards the model over this process's
devices; --distributed runs one process per host, each on its share of the batches (--out on a
filesystem every host sees). A finished run also writes report.html beside summary.json (one
self-contained page: the metrics per K, the cliff layer, the figure, the settings, the model, the first
item's prompt as tokenised and the words the tokenizer does not know). See docs/evaluation.md.
"""
import os
import sys

from absl import flags, logging

from jaxflow.cli import mesh_from_flags, run
from jaxflow.data.prompts import TEMPLATES

flags.DEFINE_enum("dataset", None, ["pope", "textvqa", "scienceqa", "chair", "toy_pope", "toy_caption"],
                  "the benchmark (toy_pope / toy_caption: generated held-out toy shapes sets)")
flags.DEFINE_string("checkpoint", None, "jaxflow checkpoint directory (default: the embedded toy model, jaxflow/assets/toy_llava)")
flags.DEFINE_string("data_dir", None, "the data set's annotation files (default: the bundled fixtures)")
flags.DEFINE_string("image_dir", None, "the image folder (required with --data_dir)")
flags.DEFINE_string("sweep", "all", "cut layers: all (K = 0..L), none (the plain model only) or a list like 0,8,16 "
                    "(L, the untruncated baseline, is always added)")
flags.DEFINE_integer("batch_size", 8, "rows per batch (may change when resuming)")
flags.DEFINE_integer("limit", None, "evaluate only the first N items")
flags.DEFINE_string("out", None, "run directory (default: outputs/eval/{model}/{dataset}-{sweep})")
flags.DEFINE_bool("skip_bad", False, "skip bad records and unreadable images (logged, counted) instead of failing")
flags.DEFINE_float("epsilon", 0.01, "cliff-layer tolerance: |metric(K') - metric(L)| <= epsilon for all K' >= cliff")
flags.DEFINE_integer("max_new_tokens", None, "answer length limit (default: pope 8, textvqa 16, scienceqa 8, "
                     "chair 128, toy_pope 4, toy_caption 24)")
flags.DEFINE_bool("overwrite", False, "delete the run directory's predictions and start over")
flags.DEFINE_enum("template", None, list(TEMPLATES), "prompt template (default: the checkpoint's own; "
                  "vicuna_v1 for converted LLaVA-1.5)")
flags.DEFINE_bool("pad_square", False, "pad images to a square with the mean colour (original LLaVA eval)")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "cast the checkpoint to this dtype (default: as stored)")
flags.DEFINE_bool("ocr", None, "textvqa: put the OCR tokens in the prompt (default: on for the llava prompt, "
                  "LLaVA-1.5's reported setting; off for the lmms prompt)")
flags.DEFINE_enum("textvqa_prompt", "llava", ["llava", "lmms"], "textvqa: the prompt wording (llava: LLaVA's "
                  "eval; lmms: lmms-eval's textvqa task)")
flags.DEFINE_string("image_ids", None, "chair: a file of COCO image ids (one per line, a JSON list, or COCO file "
                    "names) to caption instead of the --n_images seeded sample (e.g. a paper's 500 images)")
flags.DEFINE_enum("protocol", "llava", ["llava", "lmms", "corrected"], "scoring protocol of the summary: llava "
                  "(LLaVA's eval scripts and chair.py, what published tables report), lmms (lmms-eval), corrected "
                  "(our fixes); it does not change the predictions")
flags.DEFINE_bool("rescore", False, "score the saved predictions of the run in --out under --protocol without "
                  "running the model (writes summary.{protocol}.json/.csv there)")
flags.DEFINE_string("pope_splits", None, "pope: comma-separated categories (default: all found)")
flags.DEFINE_integer("n_images", 500, "chair: images sampled from COCO val2014")
flags.DEFINE_integer("seed", 0, "chair: seed of the image sample; toy sets: seed of the generated data")
flags.DEFINE_integer("toy_n", 100, "toy_pope: questions per POPE split; toy_caption: images")
flags.DEFINE_bool("progress", True, "show a progress bar")
FLAGS = flags.FLAGS


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if FLAGS.dataset is None and not FLAGS.rescore:
        print("error: --dataset is required (pope, textvqa, scienceqa, chair, toy_pope or toy_caption)",
              file=sys.stderr)
        sys.exit(2)
    from jaxflow.convert import CheckpointError
    from jaxflow.data.datasets import DatasetError
    from jaxflow.evaluation import EvalConfig, EvaluationError, run_evaluation

    if FLAGS.rescore:
        rescore()
        return
    mesh_from_flags()  # a mesh this process's devices cannot make exits 2 here, before anything is written
    options = {}
    if FLAGS.dataset == "textvqa":
        options["prompt"] = FLAGS.textvqa_prompt
        if FLAGS.ocr is not None:
            options["ocr"] = FLAGS.ocr
    elif FLAGS.dataset in ("pope", "toy_pope") and FLAGS.pope_splits:
        options["splits"] = FLAGS.pope_splits
    elif FLAGS.dataset == "chair":
        options["n_images"] = FLAGS.n_images
        if FLAGS.image_ids:
            from jaxflow.data.datasets.chair import read_image_ids

            try:
                options["image_ids"] = read_image_ids(FLAGS.image_ids)
            except (DatasetError, OSError, ValueError) as e:
                print(f"error: --image_ids: {e}", file=sys.stderr)
                sys.exit(2)
    if FLAGS.dataset in ("toy_pope", "toy_caption") and FLAGS.data_dir is None:
        options["n"] = FLAGS.toy_n
    cfg = EvalConfig(dataset=FLAGS.dataset, checkpoint=FLAGS.checkpoint, data_dir=FLAGS.data_dir,
                     image_dir=FLAGS.image_dir, out=FLAGS.out, sweep=FLAGS.sweep, batch_size=FLAGS.batch_size,
                     limit=FLAGS.limit, max_new_tokens=FLAGS.max_new_tokens, epsilon=FLAGS.epsilon,
                     skip_bad=FLAGS.skip_bad, overwrite=FLAGS.overwrite, template=FLAGS.template,
                     pad_square=FLAGS.pad_square, dtype=FLAGS.dtype, seed=FLAGS.seed, options=options,
                     progress=FLAGS.progress, protocol=FLAGS.protocol, mesh=FLAGS.mesh, sharding=FLAGS.sharding)
    try:
        res = run_evaluation(cfg)
    except (EvaluationError, DatasetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the batches written so far are kept; re-run the same command to resume",
              file=sys.stderr)
        sys.exit(130)
    s = res.summary
    print(f"{s['model']} on {s['dataset']}: {s['n_items']} items, {len(s['layers'])} cut layer(s); "
          f"this run generated {res.items_run} item(s) in {res.seconds:.1f} s")
    if "submission" in s:  # a split without answers: EvalAI upload files, no score
        print(s["note"])
        print("wrote " + ", ".join(os.path.join(res.out, f) for f in s["submission"].values()))
        return
    print_summary(s)
    if res.skipped:
        print(f"skipped {len(res.skipped)} item(s) with unreadable images (see summary.json)")
    print("wrote " + ", ".join(os.path.join(res.out, os.path.basename(p)) for p in
                               (res.files["predictions"], res.files["summary_json"], res.files["summary_csv"],
                                res.files["figure"], res.files["report"])))


def rescore():
    """--rescore: the saved predictions of --out under --protocol."""
    from jaxflow.evaluation import EvaluationError, rescore_run

    if not FLAGS.out:
        print("error: --rescore needs --out, the run folder whose predictions to score", file=sys.stderr)
        sys.exit(2)
    try:
        s = rescore_run(FLAGS.out, FLAGS.protocol, data_dir=FLAGS.data_dir, image_dir=FLAGS.image_dir)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{s['model']} on {s['dataset']}: {s['n_items']} items rescored under the {s['protocol']} protocol")
    print_summary(s)
    print(f"wrote {os.path.join(FLAGS.out, f'summary.{FLAGS.protocol}.json')} and "
          f"{os.path.join(FLAGS.out, f'summary.{FLAGS.protocol}.csv')}")


def print_summary(s):
    """The metric per cut layer, the cliff layer, the protocol and the caption notes."""
    from jaxflow.evaluation.cliff import CAPTION_DATASETS

    metric = s["primary_metric"]
    # caption sets: CHAIR alone rewards saying nothing, so recall (and the share of empty captions) go beside it
    extra = [m for m in ("recall", "empty_ratio") if s["dataset"] in CAPTION_DATASETS
             and all(m in r["metrics"] for r in s["per_layer"])]
    print(f"  {'K':>3}  {metric:>8}" + "".join(f"  {m:>11}" for m in extra))
    for k, v, r in zip(s["layers"], s["primary"], s["per_layer"]):
        print(f"  {k:>3}  {v:8.4f}" + "".join(f"  {r['metrics'][m]:11.4f}" for m in extra)
              + ("  (baseline, untruncated)" if k == s["baseline_layer"] else "")
              + ("  <- cliff" if k == s["cliff_layer"] else ""))
    for n in s.get("notes") or []:
        print(f"note: {n}")
    if s["cliff_layer"] is not None:
        print(f"cliff layer: {s['cliff_layer']} ({metric} within {s['epsilon']:g} of the baseline "
              f"{s['baseline']:.4f} for every K >= {s['cliff_layer']})")
    print(f"scoring protocol: {s.get('protocol', 'llava')}")


if __name__ == "__main__":
    run(main)
