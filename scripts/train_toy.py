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

flags.DEFINE_string("out", "outputs/toy_train", "training folder: orbax train state, log.jsonl")
flags.DEFINE_integer("steps", 3000, "optimizer steps")
flags.DEFINE_integer("batch_size", 32, "samples per step")
flags.DEFINE_float("lr", 2e-3, "peak learning rate")
flags.DEFINE_integer("warmup", 150, "linear warm-up steps")
flags.DEFINE_float("weight_decay", 0.05, "AdamW weight decay")
flags.DEFINE_integer("turns", 1, "questions per image and sequence (turns after the first are existence questions)")
flags.DEFINE_float("grounding", 0.0, "weight of the per-patch grounding loss")
flags.DEFINE_bool("question_words", False, "dialogs: supervise the object words of 'Yes' existence questions")
flags.DEFINE_float("text_fraction", 0.0, "single questions: share rewritten as text-only (caption before the "
                   "question, blank image)")
flags.DEFINE_float("align", 0.0, "weight of the projector alignment loss (object patches -> word embeddings)")
flags.DEFINE_integer("seed", 0, "seed of the weights and of the data stream")
flags.DEFINE_integer("eval_every", 250, "held-out existence accuracy every N steps")
flags.DEFINE_bool("resume", True, "continue from the latest checkpoint in --out")
flags.DEFINE_bool("ship", False, "write the trained model as a jaxflow checkpoint to --ship_to")
flags.DEFINE_string("ship_to", None, "where --ship writes (default: the embedded toy checkpoint in jaxflow/assets)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxflow.toy import train as T

    if FLAGS.steps < 1 or FLAGS.batch_size < 1 or FLAGS.lr <= 0 or FLAGS.turns < 1:
        print("error: --steps, --batch_size, --turns and --lr must be positive", file=sys.stderr)
        sys.exit(2)
    tc = T.TrainConfig(steps=FLAGS.steps, batch_size=FLAGS.batch_size, lr=FLAGS.lr, warmup=FLAGS.warmup, weight_decay=FLAGS.weight_decay,
                       seed=FLAGS.seed, eval_every=FLAGS.eval_every,
                       turns=FLAGS.turns, grounding=FLAGS.grounding,
                       question_words=FLAGS.question_words, text_fraction=FLAGS.text_fraction,
                       align=FLAGS.align)
    result = T.train(FLAGS.out, tc, resume=FLAGS.resume)
    hist = result["history"]
    evals = [h for h in hist if "existence_acc" in h]
    if evals:
        last = evals[-1]
        print(f"step {last['step']}: held-out existence accuracy {last['existence_acc']:.3f}, "
              f"loss {last['loss']:.3f}, {last['elapsed_s']:.0f} s this run")
    if FLAGS.ship:
        from jaxflow.toy import TOY_CHECKPOINT

        meta = {"train": json.load(open(os.path.join(FLAGS.out, "train_config.json"))),
                "existence_acc": evals[-1]["existence_acc"] if evals else None}
        path = T.ship(result["model"], result["tokenizer"], FLAGS.ship_to or TOY_CHECKPOINT, meta=meta)
        print(f"shipped {path}")


if __name__ == "__main__":
    run(main)
