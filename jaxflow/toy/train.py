"""Training the toy LLaVA on synthetic shapes VQA: optax AdamW, warm-up + cosine, clipping, orbax resume.

The loss is the cross-entropy of the answer tokens (and the EOS after them) under teacher forcing,
with the same forward that every analysis uses (`jaxflow.forward.forward_core`). A batch is a pure
function of (seed, step) and the step is jit-compiled once, so a run resumed from its orbax
checkpoint follows the same loss curve as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxflow.data.image import ImageSpec, preprocess_images
from jaxflow.data.prompts import encode_batch, format_prompt
from jaxflow.data.tiny_tokenizer import (TINY_BOS, TINY_EOS, TINY_IMAGE_TOKEN_ID, TINY_PAD, TINY_VOCAB_SIZE,
                                         build_tiny_tokenizer)
from jaxflow.forward import forward_core
from jaxflow.models.config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from jaxflow.models.llava import Llava
from jaxflow.toy import data as toy_data

TEMPLATE = "llava_hf"  # "USER: <image>\n{q} ASSISTANT:": S = BOS, USER, ":" (short sequences train fast)


def toy_config() -> LlavaConfig:
    """LLaVA-1.5's architecture at toy size: 112 px, 8x8 grid, 4 vision and 4 decoder layers."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=96, intermediate_size=256, num_layers=4, num_heads=4,
                            image_size=toy_data.IMAGE_SIZE, patch_size=14),
        text=TextConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=512,
                        rope=RopeConfig(theta=10000.0, original_max_position_embeddings=512),
                        bos_token_id=TINY_BOS, eos_token_id=(TINY_EOS,), pad_token_id=TINY_PAD),
        image_token_id=TINY_IMAGE_TOKEN_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Defaults: the recipe of the shipped model (docs/toy.md): six-question dialogs, 16 a step, the
    grounding and question-word terms, projector alignment, lr 1e-3, no weight decay."""
    steps: int = 2500
    batch_size: int = 16  # images (dialogs) per step
    lr: float = 1e-3
    warmup: int = 150
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 1
    eval_every: int = 250
    eval_size: int = 256
    save_every: int = 250
    turns: int = 6  # questions per image and sequence (turns after the first are existence questions)
    grounding: float = 1.0  # weight of the per-patch grounding loss (image positions predict their object's words)
    question_words: bool = True  # dialogs: also supervise the colour and shape words of "Yes" existence questions
    text_fraction: float = 0.0  # single questions: this share gets the caption before the question and a blank image
    align: float = 1.0  # weight of the projector alignment loss (object patches -> embed(colour) + embed(shape))


def _spec():
    return ImageSpec.for_size(toy_data.IMAGE_SIZE)


def described(examples, fraction: float, rng: np.random.Generator):
    """(examples, is_text (B,) bool): a `fraction` of the examples rewritten as text-only ones, the
    caption put before the question ("a red circle and a blue square . Is there ...") and the image
    replaced by a blank grey one, so that the decoder learns to bind words on text too."""
    from PIL import Image

    is_text = rng.random(len(examples)) < fraction
    blank = Image.new("RGB", (toy_data.IMAGE_SIZE,) * 2, (128, 128, 128))
    out = [dataclasses.replace(e, question=f"{toy_data.caption(e.objects)} . {e.question}", image=blank)
           if t else e for e, t in zip(examples, is_text)]
    return out, is_text


def make_batch(examples, tokenizer, cfg: LlavaConfig, is_text=None) -> dict:
    """Examples -> numpy arrays: input_ids/attention_mask (B, T) (right padded), loss_mask (B, T) True where
    the token is predicted (answer tokens and the EOS after them), pixel_values (B, 3, H, W), and the
    per-patch targets (`patch_targets`; none for rows marked in is_text (B,) bool)."""
    prompts = [format_prompt(e.question, TEMPLATE) for e in examples]
    answers = [list(tokenizer(e.answer, add_special_tokens=False).input_ids) + [TINY_EOS] for e in examples]
    enc = encode_batch(tokenizer, prompts, image_token="<image>", image_token_id=cfg.image_token_id,
                       num_image_tokens=cfg.num_image_tokens, answers=answers, padding_side="right")
    pixels = preprocess_images([e.image for e in examples], _spec())
    ids, att, loss_mask = _pad_to_bucket(enc.input_ids, enc.attention_mask, enc.answer_mask)
    patches = patch_targets([e.objects for e in examples], tokenizer, cfg)
    if is_text is not None:
        patches["patch_mask"] &= ~np.asarray(is_text, bool)[:, None]
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss_mask, "pixel_values": pixels, **patches}


LENGTH_BUCKET = 16  # sequence lengths are padded to a multiple of this: the train step compiles a few times only


def _pad_to_bucket(input_ids, attention_mask, loss_mask):
    """Right-pads (B, T) arrays to T rounded up to LENGTH_BUCKET (padding is masked out everywhere)."""
    t = input_ids.shape[1]
    extra = -(-t // LENGTH_BUCKET) * LENGTH_BUCKET - t
    pad = lambda a, v: np.pad(np.asarray(a), ((0, 0), (0, extra)), constant_values=v)  # noqa: E731
    return pad(input_ids, TINY_PAD), pad(attention_mask, 0), pad(loss_mask, False)


def patch_targets(objects_per_image, tokenizer, cfg: LlavaConfig) -> dict:
    """Per image-grid cell, the colour and shape word ids of the object whose box holds the cell's
    centre: patch_words (B, N, 2) int32, patch_mask (B, N) bool (False: background)."""
    grid = cfg.vision.image_size // cfg.vision.patch_size
    cell = cfg.vision.image_size / grid
    centres = (np.arange(grid) + 0.5) * cell
    words = np.zeros((len(objects_per_image), grid * grid, 2), np.int32)
    mask = np.zeros((len(objects_per_image), grid * grid), bool)
    for b, objs in enumerate(objects_per_image):
        for o in objs:
            x0, y0, x1, y1 = o.box
            ys = np.flatnonzero((centres >= y0) & (centres < y1))
            xs = np.flatnonzero((centres >= x0) & (centres < x1))
            idx = (ys[:, None] * grid + xs[None, :]).ravel()
            words[b, idx] = (_word_id(tokenizer, o.color), _word_id(tokenizer, o.shape))
            mask[b, idx] = True
    return {"patch_words": words, "patch_mask": mask}


def _word_id(tokenizer, word: str) -> int:
    (i,) = tokenizer(word, add_special_tokens=False).input_ids
    return int(i)


def make_dialog_batch(dialogs, tokenizer, cfg: LlavaConfig, question_words: bool = False) -> dict:
    """Dialogs -> the arrays of `make_batch`, one sequence per image: the first turn formatted exactly as
    a single question (``format_prompt``), each later turn appended as ``USER: {q} ASSISTANT:``; every
    answer and the EOS after it are supervised. question_words: the colour and shape words of existence
    questions answered "Yes" are supervised too (they name an object of the image: predicting the shape
    after the colour word makes the model look it up in the image)."""
    object_words = {_word_id(tokenizer, w) for w in list(toy_data.COLORS) + list(toy_data.SHAPES)}
    rests, sups = [], []  # per dialog: the ids after the first prompt, and which of them are supervised
    for d in dialogs:
        rest, sup = [], []
        for t, (q, a, kind) in enumerate(d.turns):
            p = [] if t == 0 else list(tokenizer(f"USER: {q} ASSISTANT:", add_special_tokens=False).input_ids)
            ans = list(tokenizer(a, add_special_tokens=False).input_ids) + [TINY_EOS]
            rest += p + ans
            sup += [question_words and kind == "existence" and a == "Yes" and tok in object_words for tok in p]
            sup += [True] * len(ans)
        rests.append(rest)
        sups.append(sup)
    first = [d.turns[0] for d in dialogs]
    enc = encode_batch(tokenizer, [format_prompt(q, TEMPLATE) for q, _, _ in first], image_token="<image>",
                       image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_image_tokens, answers=rests,
                       padding_side="right")
    loss_mask = np.zeros_like(enc.answer_mask)
    for r, sup in enumerate(sups):
        loss_mask[r, enc.answer_mask[r]] = sup
        _, a, kind = first[r]
        if question_words and kind == "existence" and a == "Yes":  # the first question's object words
            n = enc.prompt_lengths[r]
            loss_mask[r, :n] = np.isin(enc.input_ids[r, :n], list(object_words))
    input_ids, attention = enc.input_ids, enc.attention_mask
    pixels = preprocess_images([d.image for d in dialogs], _spec())
    input_ids, attention, loss_mask = _pad_to_bucket(input_ids, attention, loss_mask)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask, "pixel_values": pixels,
            **patch_targets([d.objects for d in dialogs], tokenizer, cfg)}


def answer_loss(model, batch, grounding: float = 0.0, align: float = 0.0):
    """Mean cross-entropy of the answer tokens, and the answer-token accuracy. Optional terms:
    `grounding` x the per-patch grounding loss (the logits at each image position that lies on an
    object put mass on its colour and shape words); `align` x the alignment loss (the projected
    image feature of such a patch approaches embed(colour) + embed(shape), relative squared error,
    the embeddings held fixed for this term)."""
    feats = model.image_features(batch["pixel_values"])  # (B, N, D), computed once for both terms
    x = model.embed_with_features(batch["input_ids"], feats)
    out = forward_core(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], input_embeds=x)
    logits = out.logits[:, :-1]  # position p predicts token p + 1
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = (nll * mask).sum() / mask.sum()
    acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
    if grounding:
        n = batch["patch_mask"].shape[1]
        img_pos = jnp.argsort(batch["input_ids"] != model.config.image_token_id, axis=1, stable=True)[:, :n]
        logp = jax.nn.log_softmax(jnp.take_along_axis(out.logits, img_pos[..., None], axis=1))  # (B, N, V)
        ll = jnp.take_along_axis(logp, batch["patch_words"], axis=-1).mean(-1)  # (B, N)
        pm = batch["patch_mask"].astype(jnp.float32)
        loss = loss + grounding * -(ll * pm).sum() / jnp.maximum(pm.sum(), 1.0)
    if align:
        emb = model.language_model.embed_tokens[...]
        tgt = jax.lax.stop_gradient(emb[batch["patch_words"][..., 0]] + emb[batch["patch_words"][..., 1]])
        err = ((feats - tgt) ** 2).sum(-1) / ((tgt ** 2).sum(-1) + 1e-6)  # (B, N)
        pm = batch["patch_mask"].astype(jnp.float32)
        loss = loss + align * (err * pm).sum() / jnp.maximum(pm.sum(), 1.0)
    return loss, acc


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, max(tc.steps, tc.warmup + 1), tc.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(tc.clip), optax.adamw(sched, b1=0.9, b2=0.98,
                                                                       weight_decay=tc.weight_decay))


@partial(jax.jit, static_argnames=("graphdef", "tx", "grounding", "align"), donate_argnums=(0, 1))
def train_step(params, opt_state, batch, *, graphdef, tx, grounding=0.0, align=0.0):
    def loss_fn(p):
        return answer_loss(nnx.merge(graphdef, p), batch, grounding, align)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc


class _Prefetch:
    """Builds the batches of steps [start, stop) in a background thread (PIL and the tokenizer run
    while the jitted step computes)."""

    def __init__(self, fn, start, stop, depth=3):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.t = threading.Thread(target=self._run, args=(fn, start, stop), daemon=True)
        self.t.start()

    def _run(self, fn, start, stop):
        try:
            for s in range(start, stop):
                self.q.put(fn(s))
        except BaseException as e:  # handed to the consumer, which re-raises it (never a silent hang)
            self.q.put(e)

    def get(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item


def eval_examples(seed: int, n: int, kind: str = "existence") -> list:
    """Held-out samples: a seed space disjoint from training's."""
    return toy_data.examples(seed + 10_000_019, 0, n, kind=kind)


@jax.jit
def _first_token(model, ids, pixels, mask):
    out = forward_core(model, ids, pixels, mask)
    last = ids.shape[1] - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
    return out.logits[jnp.arange(ids.shape[0]), last].argmax(-1)


def first_token_accuracy(model, examples, tokenizer, batch_size: int = 64) -> float:
    """Share of samples whose greedy first answer token is the first token of the gold answer."""
    cfg = model.config
    right = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        enc = encode_batch(tokenizer, [format_prompt(e.question, TEMPLATE) for e in chunk], image_token="<image>",
                           image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_image_tokens,
                           padding_side="left")
        pixels = preprocess_images([e.image for e in chunk], _spec())
        pred = np.asarray(_first_token(model, jnp.asarray(enc.input_ids), jnp.asarray(pixels),
                                       jnp.asarray(enc.attention_mask)))
        gold = [tokenizer(e.answer, add_special_tokens=False).input_ids[0] for e in chunk]
        right += int((pred == np.asarray(gold)).sum())
    return right / len(examples)


def train(out_dir: str, tc: TrainConfig = TrainConfig(), *, resume: bool = True, progress: bool = True,
          log=print, stop_after: int | None = None) -> dict:
    """Trains (or resumes) the toy model; orbax checkpoints of params + optimizer state in
    out_dir/train_state, a log in out_dir/log.jsonl. Returns {"model", "history", ...}.
    stop_after: stop (as if interrupted) after that many steps of this call (for tests)."""
    import orbax.checkpoint as ocp

    check_train_config(tc)
    cfg = toy_config()
    tok = build_tiny_tokenizer()
    model = Llava(cfg, rngs=nnx.Rngs(tc.seed))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tx = optimizer(tc)
    opt_state = tx.init(params)
    os.makedirs(out_dir, exist_ok=True)
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "train_state")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start, elapsed0 = 0, 0.0
    log_path = os.path.join(out_dir, "log.jsonl")
    resuming = resume and mngr.latest_step() is not None
    if resuming:
        _check_resumable(out_dir, tc, int(mngr.latest_step()))
    with open(os.path.join(out_dir, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(tc), f, indent=2)
    if resuming:
        start = int(mngr.latest_step())
        target = {"params": params, "opt_state": opt_state}
        restored = mngr.restore(start, args=ocp.args.StandardRestore(jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)))
        params, opt_state = restored["params"], restored["opt_state"]
        log(f"resumed from step {start}")
        _truncate_log(log_path, start)
        done = read_log(out_dir)
        elapsed0 = done[-1]["elapsed_s"] if done else 0.0  # wall time counts on across resumptions
    elif os.path.exists(log_path):
        os.remove(log_path)
    stop = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    if tc.turns > 1:
        batch_fn = lambda s: make_dialog_batch(toy_data.dialogs(tc.seed, s, tc.batch_size, tc.turns), tok, cfg,  # noqa: E731
                                               tc.question_words)
    else:
        def batch_fn(s):
            exs, is_text = described(toy_data.examples(tc.seed, s, tc.batch_size), tc.text_fraction,
                                     np.random.default_rng([tc.seed, s, 1]))
            return make_batch(exs, tok, cfg, is_text)
    fetch = _Prefetch(batch_fn, start, stop)
    held_out = eval_examples(tc.seed, tc.eval_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="training", unit="step")
    history, t0 = [], time.perf_counter() - elapsed0
    with open(log_path, "a") as logf:
        for step in range(start, stop):
            batch = {k: jnp.asarray(v) for k, v in fetch.get().items()}
            params, opt_state, loss, acc = train_step(params, opt_state, batch, graphdef=graphdef, tx=tx,
                                                     grounding=float(tc.grounding), align=float(tc.align))
            rec = {"step": step + 1, "loss": float(loss), "token_acc": float(acc),
                   "elapsed_s": time.perf_counter() - t0}
            if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
                rec["existence_acc"] = first_token_accuracy(nnx.merge(graphdef, params), held_out, tok)
            history.append(rec)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['token_acc']:.2f}",
                                **({"exist": f"{rec['existence_acc']:.3f}"} if "existence_acc" in rec else {}))
            if (step + 1) % tc.save_every == 0 or step + 1 == stop:
                mngr.save(step + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    mngr.wait_until_finished()
    mngr.close()
    if bar is not None:
        bar.close()
    return {"model": nnx.merge(graphdef, params), "history": history, "tokenizer": tok, "steps_done": stop}


class TrainSetupError(ValueError):
    """Settings that cannot be trained, or a run folder that cannot be resumed with them (one line)."""


def check_train_config(tc: TrainConfig) -> None:
    """Raises TrainSetupError on settings that are out of range or that would be ignored."""
    if tc.steps < 1 or tc.batch_size < 1 or tc.turns < 1 or tc.lr <= 0 or tc.eval_every < 1 or tc.save_every < 1:
        raise TrainSetupError("--steps, --batch_size, --turns, --lr, --eval_every and save_every must be positive")
    if tc.text_fraction and tc.turns > 1:
        raise TrainSetupError(f"--text_fraction applies to single questions: add --turns 1 (got --turns {tc.turns})")
    if tc.question_words and tc.turns == 1:
        raise TrainSetupError("--question_words applies to dialogs (--turns > 1): add --noquestion_words with --turns 1")
    if not 0 <= tc.text_fraction <= 1:
        raise TrainSetupError(f"--text_fraction must lie in [0, 1], got {tc.text_fraction}")


# settings that may change when a run is resumed (they do not change the parameters' trajectory)
RESUMABLE_CHANGES = ("eval_every", "eval_size", "save_every")


def _check_resumable(out_dir: str, tc: TrainConfig, latest: int) -> None:
    """Refuses to resume a run trained with other settings, or one already past tc.steps."""
    path = os.path.join(out_dir, "train_config.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    new = dataclasses.asdict(tc)
    diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in RESUMABLE_CHANGES and old.get(k) != v]
    if diffs or latest > tc.steps:
        why = ", ".join(diffs) if diffs else f"it is at step {latest}, past --steps {tc.steps}"
        raise TrainSetupError(f"{out_dir} holds a run with other settings ({why}): pass --noresume to start over "
                         "or choose another --out")


def read_log(out_dir: str) -> list[dict]:
    """The records of out_dir/log.jsonl (one per step; "existence_acc" on evaluation steps)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def log_summary(records: list[dict], target: float = 0.95) -> dict:
    """A training log in numbers: steps done, the last held-out existence accuracy, and the first
    evaluation step at or above `target` with its wall time (elapsed_s: training wall time since the
    run began, summed over resumptions; the time between them is not counted)."""
    evals = [r for r in records if "existence_acc" in r]
    hit = next((r for r in evals if r["existence_acc"] >= target), None)
    return {"steps": records[-1]["step"] if records else 0,
            "seconds": records[-1]["elapsed_s"] if records else None,
            "existence_acc": evals[-1]["existence_acc"] if evals else None,
            "target": target, "step_at_target": hit["step"] if hit else None,
            "seconds_to_target": hit["elapsed_s"] if hit else None}


def _truncate_log(path: str, step: int) -> None:
    """Keeps the log's records up to `step` (a resumed run rewrites what came after)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [l for l in f if l.strip() and l.endswith("\n") and json.loads(l)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def ship(model: Llava, tokenizer, path: str, *, overwrite: bool = True, meta: dict | None = None) -> str:
    """Writes the model as a jaxflow checkpoint (what convert_checkpoint.py writes) with its tokenizer,
    image-processor settings and a toy.json describing the task, so `jaxflow.load` and
    `pipeline.load_bundle` read it like any converted LLaVA."""
    spec = _spec()
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": spec.shortest_edge},
           "do_center_crop": True, "crop_size": {"height": spec.crop_size[0], "width": spec.crop_size[1]},
           "do_rescale": True, "rescale_factor": spec.rescale_factor, "do_normalize": True,
           "image_mean": list(spec.image_mean), "image_std": list(spec.image_std), "resample": spec.resample,
           "do_convert_rgb": True}
    toy = {"task": "synthetic shapes VQA (jaxflow.toy.data)", "template": TEMPLATE, "colors": list(toy_data.COLORS),
           "shapes": list(toy_data.SHAPES), **(meta or {})}
    import tempfile

    from jaxflow.convert.checkpoint import save_model

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return save_model(model, path, overwrite=overwrite, sidecar_dir=tmp,
                          extra_files={"preprocessor_config.json": json.dumps(pre, indent=2),
                                       "toy.json": json.dumps(toy, indent=2)})
