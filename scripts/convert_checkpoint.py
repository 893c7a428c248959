"""Convert a checkpoint of a supported family (LLaVA-1.5, InternVL -hf, Qwen2-VL, Qwen2.5-VL, the official
Qwen-VL) to a jaxflow checkpoint; the family comes from config.json's model_type.

    python scripts/convert_checkpoint.py --hf_dir path/to/llava-1.5-7b-hf --out checkpoints/llava-1.5-7b \
        [--dtype float32|bfloat16] [--overwrite]
    python scripts/convert_checkpoint.py --hf_dir path/to/InternVL3-1B-hf --out checkpoints/internvl3-1b
"""
import sys

from absl import flags, logging

from jaxflow.cli import run

flags.DEFINE_string("hf_dir", None, "model directory (transformers LLaVA, InternVL -hf, Qwen2-VL, Qwen2.5-VL, or "
                    "the official Qwen-VL): config.json + *.safetensors (sharded or not) + tokenizer files")
flags.DEFINE_string("out", None, "output checkpoint directory, e.g. checkpoints/llava-1.5-7b")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dtype of the stored weights")
flags.DEFINE_bool("overwrite", False, "replace an existing --out")
flags.DEFINE_bool("allow_no_tokenizer", False, "convert a directory that holds no tokenizer files (the weights "
                  "alone; the scripts cannot tokenise prompts with the result)")
flags.mark_flags_as_required(["hf_dir", "out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
    from jaxflow.convert import CheckpointError, ConversionError, convert_checkpoint

    try:
        out = convert_checkpoint(FLAGS.hf_dir, FLAGS.out, FLAGS.dtype, overwrite=FLAGS.overwrite,
                                 allow_no_tokenizer=FLAGS.allow_no_tokenizer)
    except (ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
