"""Train the toy LLaVA on synthetic shapes VQA (optax AdamW, warm-up + cosine, clipping), with orbax
checkpoints and resume; optionally ship it as the embedded default.

    python scripts/train_toy.py                      # trains into outputs/toy_train (resumes if present)
    python scripts/train_toy.py --ship               # ... and writes jaxflow/assets/toy_llava
"""
import json
import os
import sys

from absl import flags, logging

from jaxflow.cli import run
from jaxflow.toy import train as T

flags.DEFINE_string("out", "outputs/toy_train", "training folder: orbax train state, log.jsonl")
flags.DEFINE_integer("steps", T.TrainConfig.steps, "optimizer steps")
flags.DEFINE_integer("batch_size", T.TrainConfig.batch_size, "images (dialogs) per step")
flags.DEFINE_float("lr", T.TrainConfig.lr, "peak learning rate")
flags.DEFINE_integer("warmup", T.TrainConfig.warmup, "linear warm-up steps")
flags.DEFINE_float("weight_decay", T.TrainConfig.weight_decay, "AdamW weight decay")
flags.DEFINE_integer("turns", T.TrainConfig.turns, "questions per image and sequence (turns after the first are existence questions)")
flags.DEFINE_float("grounding", T.TrainConfig.grounding, "weight of the per-patch grounding loss")
flags.DEFINE_bool("question_words", T.TrainConfig.question_words, "dialogs: supervise the object words of 'Yes' existence questions")
flags.DEFINE_float("text_fraction", T.TrainConfig.text_fraction, "single questions: share rewritten as text-only (caption before the "
                   "question, blank image)")
flags.DEFINE_float("align", T.TrainConfig.align, "weight of the projector alignment loss (object patches -> word embeddings)")
flags.DEFINE_integer("seed", T.TrainConfig.seed, "seed of the weights and of the data stream")
flags.DEFINE_integer("eval_every", T.TrainConfig.eval_every, "held-out existence accuracy every N steps")
flags.DEFINE_bool("resume", True, "continue from the latest checkpoint in --out")
flags.DEFINE_bool("ship", False, "write the trained model as a jaxflow checkpoint to --ship_to")
flags.DEFINE_string("ship_to", None, "where --ship writes (default: the embedded toy checkpoint in jaxflow/assets)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    tc = T.TrainConfig(steps=FLAGS.steps, batch_size=FLAGS.batch_size, lr=FLAGS.lr, warmup=FLAGS.warmup, weight_decay=FLAGS.weight_decay,
                       seed=FLAGS.seed, eval_every=FLAGS.eval_every,
                       turns=FLAGS.turns, grounding=FLAGS.grounding,
                       question_words=FLAGS.question_words, text_fraction=FLAGS.text_fraction,
                       align=FLAGS.align)
    try:
        result = T.train(FLAGS.out, tc, resume=FLAGS.resume)
    except T.TrainSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = T.log_summary(T.read_log(FLAGS.out))
    if summary["existence_acc"] is not None:
        reached = ("not reached" if summary["step_at_target"] is None else
                   f"reached at step {summary['step_at_target']} ({summary['seconds_to_target']:.0f} s)")
        print(f"step {summary['steps']}: held-out existence accuracy {summary['existence_acc']:.3f}; "
              f"target {summary['target']:.2f} {reached}")
    if FLAGS.ship:
        from jaxflow.toy import TOY_CHECKPOINT

        meta = {"train": json.load(open(os.path.join(FLAGS.out, "train_config.json"))), "log": summary}
        path = T.ship(result["model"], result["tokenizer"], FLAGS.ship_to or TOY_CHECKPOINT, meta=meta)
        print(f"shipped {path}")

if __name__ == "__main__":
    run(main)
