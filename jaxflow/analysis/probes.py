"""Per-layer linear probes: what the residual stream at the last prompt token knows, layer by layer.

The question a probe answers: at layer l, is the information needed for the answer (or the presence
of an object in the image) *linearly readable* from the residual stream at the position that will
produce the answer? Set against the truncation curve of the same data (docs/truncation.md), it
separates "the image has been read into the text positions" from "the model uses it".

    from jaxflow.analysis.probes import probe_features, train_probes
    feats = probe_features(bundle, items)              # (N, L+1, D) + labels, one forward per batch
    res = train_probes(feats.features, feats.targets)   # every probe at every layer in one jitted loop
    res.accuracy[res.index("answer")]                   # held-out accuracy per layer, res.ci_low / ci_high

Features. Row l < L is the residual stream *entering* decoder layer l at the last prompt token (row 0
is the token's embedding: it has read nothing yet); row L is the last layer's output, before the final
norm (so ``model.language_model.logits`` of it is the next-token logits). Items are batched as the
evaluation runner batches them (`jaxflow.evaluation.runner`: ``prompt_lengths``, ``plan_batches``,
``prepare_batch``): in every batch the prompt ends at the last column, and one forward per batch
captures only that row of every layer (``run_layers(capture=("residual",), capture_rows=...)``).

Probes. One multinomial logistic regression per (probe, layer), with a reference class (class 0's
logit is fixed at 0, so a two-class probe is exactly a logistic regression on one logit); the
objective is the mean cross-entropy over the training items plus ``weight_decay / 2 * ||w||^2``
(biases not penalised), i.e. L2-regularised logistic regression. Features are standardised per layer
and dimension with the training items' mean and standard deviation (a dimension that is constant on
the training items is only centred). All probes and layers are trained at once: one loss per
(probe, layer), ``jax.vmap`` over layers and probes, summed; Adam is elementwise, so the sum trains
every probe independently. Full-batch Adam (optax) with cosine-decayed learning rate, ``steps``
steps, inside one ``jax.jit`` (``lax.scan`` over the steps).

Held-out accuracy. Items are split once into train / test (``split_items``: by group, default the
image, so that the questions of one image are never on both sides: POPE asks six per image), the
same split for every probe and layer. Accuracy on the test items with a 95% Wilson score interval
(``wilson_interval``); ``chance`` is the accuracy of always answering the training items' majority
class on the test items (what a probe on a feature that carries nothing scores).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

Z95 = 1.959963984540054  # the two-sided 95% normal quantile

FEATURE_DEFINITION = ("residual stream at the last prompt token: row l < L is the input of decoder layer l "
                      "(row 0: the token's embedding), row L the last layer's output before the final norm")
CI_DEFINITION = "Wilson score interval, 95%, over the held-out (test) items"
PROBE_GROUPS = ("answer", "presence", "question")  # the kinds of probes, in figure order


class ProbeError(ValueError):
    """Bad input to the probes (one line, the scripts print it and exit with code 2)."""


# --------------------------------------------------------------------------- targets (labels)


@dataclasses.dataclass
class ProbeTarget:
    """What one probe predicts: a class index per item (-1: no label, left out of training and test)."""

    name: str  # "answer", "color:red", "shape:circle", "question_color", "object:dog", ...
    labels: np.ndarray  # (N,) int32 class index into `classes`, -1 where the item has no label
    classes: tuple[str, ...]  # class names (two for a binary probe: ("no", "yes") or ("absent", "present"))
    group: str = "answer"  # one of PROBE_GROUPS: the gold answer / an object in the image / the question


def _target(name: str, values, group: str, classes=None) -> ProbeTarget | None:
    """values: a class name per item (None: no label) -> ProbeTarget with classes sorted (or given);
    None when fewer than two classes occur."""
    present = sorted({v for v in values if v is not None})
    classes = tuple(classes) if classes is not None else tuple(present)
    if len([c for c in classes if c in present]) < 2:
        return None
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index.get(v, -1) if v is not None else -1 for v in values], np.int32)
    return ProbeTarget(name, labels, classes, group)


def read_toy_objects(boxes) -> dict[str, list[dict]]:
    """The toy POPE set's ``boxes.jsonl`` (`jaxflow.toy.sets.write_toy_pope`; a path to it or to the
    folder holding it) -> {image file name: [{"color", "shape", "box"}, ...]}."""
    path = os.path.join(boxes, "boxes.jsonl") if os.path.isdir(boxes) else boxes
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[os.path.basename(row["image"])] = list(row["objects"])
    return out


def _question_attribute(question: str, words) -> str | None:
    found = [w for w in words if re.search(rf"\b{re.escape(w)}\b", question.lower())]
    return found[0] if len(found) == 1 else None


def probe_targets(items, *, boxes=None, max_classes: int = 20) -> dict[str, ProbeTarget]:
    """The probes a data set supports, from its items (`jaxflow.data.datasets` Items of one data set).

    - "answer" (group answer): pope / toy_pope yes / no; scienceqa the letter; textvqa the most
      frequent of the ten human answers, among the ``max_classes`` most frequent such answers (other
      items get no label).
    - toy sets (group presence): "color:{c}" and "shape:{s}" for every colour and shape of
      `jaxflow.toy.data` (present / absent in the image), from the objects of each image: toy_caption
      items carry them; toy_pope reads them from ``boxes`` (the set's ``boxes.jsonl``, or its folder,
      or a dict {image file name: objects}); without boxes toy_pope has no presence probes.
    - toy_pope (group question): "question_color" and "question_shape", the colour and shape the
      question names (text, not image: a control that the probe reads what the position has seen).
    - chair (group presence): "object:{class}" for the ``max_classes`` most frequent COCO classes.
    """
    items = list(items)
    if not items:
        raise ProbeError("no items to probe")
    dataset = items[0].dataset
    out: dict[str, ProbeTarget] = {}

    def add(t):
        if t is not None:
            out[t.name] = t

    if dataset in ("pope", "toy_pope"):
        add(_target("answer", [(it.answer or "").strip().lower() or None for it in items], "answer", ("no", "yes")))
    elif dataset == "scienceqa":
        add(_target("answer", [(it.answer or "").strip().upper() or None for it in items], "answer"))
    elif dataset == "textvqa":
        firsts = [Counter(a.strip().lower() for a in it.answers).most_common(1)[0][0] if it.answers else None
                  for it in items]
        top = {a for a, _ in Counter(a for a in firsts if a is not None).most_common(max_classes)}
        add(_target("answer", [a if a in top else None for a in firsts], "answer"))
    if dataset in ("toy_pope", "toy_caption"):
        from jaxflow.toy.data import COLORS, SHAPES

        if dataset == "toy_caption":
            objects = [list(it.metadata.get("objects") or []) for it in items]
        elif boxes is not None:
            table = boxes if isinstance(boxes, dict) else read_toy_objects(boxes)
            objects = [table.get(os.path.basename(it.image)) for it in items]
        else:
            objects = None
        if objects is not None:
            for c in COLORS:
                add(_target(f"color:{c}", [None if o is None else
                                           ("present" if any(x["color"] == c for x in o) else "absent")
                                           for o in objects], "presence", ("absent", "present")))
            for s in SHAPES:
                add(_target(f"shape:{s}", [None if o is None else
                                           ("present" if any(x["shape"] == s for x in o) else "absent")
                                           for o in objects], "presence", ("absent", "present")))
        if dataset == "toy_pope":
            add(_target("question_color", [_question_attribute(it.question, COLORS) for it in items], "question",
                        tuple(COLORS)))
            add(_target("question_shape", [_question_attribute(it.question, SHAPES) for it in items], "question",
                        tuple(SHAPES)))
    if dataset == "chair":
        counts = Counter(c for it in items for c in set(it.answers))
        for c, _ in counts.most_common(max_classes):
            add(_target(f"object:{c}", ["present" if c in it.answers else "absent" for it in items], "presence",
                        ("absent", "present")))
    if not out:
        raise ProbeError(f"{dataset}: the items give no probe target with two classes or more")
    return out


# --------------------------------------------------------------------------- features


@dataclasses.dataclass
class ProbeFeatures:
    features: np.ndarray  # (N, L+1, D) float32, FEATURE_DEFINITION
    targets: dict  # name -> ProbeTarget (labels per item)
    ids: list  # item ids, in the items' order
    groups: list  # the image of each item (`split_items` keeps an image's questions on one side)
    next_token: np.ndarray  # (N,) int32: the model's greedy next token (argmax of the logits of row L)
    seconds: float  # wall time of the forwards (compilation included)
    truncation: dict | None = None  # {K: [answer per item]} when asked for (`probe_features(truncation=...)`)


def _last_rows(mask) -> jax.Array:
    return (mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)).astype(jnp.int32)


@partial(jax.jit, static_argnames=("impl",))
def _features_jit(model, ids, images, mask, impl="fused"):
    """(B, L+1, D) float32 features at each row's last real token, and the greedy next token (B,)."""
    from jaxflow.forward import causal_allowed

    lm = model.language_model
    b, t = ids.shape
    x = model.embed(ids, images, impl)
    positions = model.positions(ids, mask, images)
    cos, sin = model.rope_tables(positions, x.dtype, context_len=t)
    allowed = causal_allowed(mask > 0, jnp.broadcast_to(jnp.arange(t), ids.shape), t)
    last = _last_rows(mask)
    out = lm.run_layers(x, cos, sin, allowed, impl=impl, capture=("residual",), capture_rows=last[:, None])
    res = out.captures["residual"][:, :, 0]  # (L, B, D): the input of each layer at the last row
    final = out.hidden[jnp.arange(b), last]  # (B, D): the last layer's output
    feats = jnp.concatenate([res, final[None]], 0).transpose(1, 0, 2).astype(jnp.float32)
    logits = lm.logits(final[:, None])[:, 0]
    return feats, jnp.argmax(logits, -1).astype(jnp.int32)


def batch_features(model, input_ids, pixel_values, attention_mask=None, *, attn_impl: str = "fused", **image_kw):
    """One forward: features (B, L+1, D) float32 at each row's last real token (FEATURE_DEFINITION)
    and the greedy next token (B,), as numpy."""
    from jaxflow.forward import _check_impl, validate_inputs

    _check_impl(attn_impl)
    ids, mask = validate_inputs(model, input_ids, pixel_values, attention_mask, **image_kw)
    images = model.image_inputs(ids, mask, pixel_values, **image_kw)
    feats, nxt = _features_jit(model, jnp.asarray(ids), images, jnp.asarray(mask), attn_impl)
    return np.asarray(feats), np.asarray(nxt)


def probe_features(bundle, items, *, batch_size: int = 16, length_bucket: int = 16, pad_square: bool = False,
                   boxes=None, max_classes: int = 20, truncation=None, max_new_tokens: int | None = None,
                   progress=None) -> ProbeFeatures:
    """Features (N, L+1, D) and probe labels for a list of data set items, one forward per batch.

    Batches as the evaluation runner makes them (longest prompts first; `prepare_batch` lays every
    row out so its prompt ends at the last column; a short last batch is filled with copies of its
    first row, dropped here). boxes, max_classes: `probe_targets`. truncation: cut layers K (a list,
    or "all" for 0..L) to also decode each item's answer under, from the same batches
    (`jaxflow.evaluation.runner.generate_batch`, i.e. `truncation_generate`, exactly what
    scripts/evaluate.py decodes; at most ``max_new_tokens``, default the data set's): the result's
    ``truncation`` is {K: [answer text per item]}. progress(message) is called per batch.
    """
    from jaxflow.evaluation.runner import DEFAULT_MAX_NEW_TOKENS, generate_batch, plan_batches, prepare_batch, \
        prompt_lengths

    items = list(items)
    if not items:
        raise ProbeError("no items to probe")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ProbeError(f"batch_size must be a positive integer, got {batch_size!r}")
    targets = probe_targets(items, boxes=boxes, max_classes=max_classes)
    model = bundle.model
    L = int(model.config.text.num_layers)
    ks = None
    if truncation is not None:
        ks = list(range(L + 1)) if truncation == "all" else sorted({int(k) for k in truncation} | {L})
        if min(ks) < 0 or max(ks) > L:
            raise ProbeError(f"cut layers must lie in 0..{L}, got {sorted(set(ks))}")
        max_new = int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(items[0].dataset, 8))
    t0 = time.perf_counter()
    plan = plan_batches(prompt_lengths(bundle, items), int(batch_size))
    feats, nxt = [None] * len(items), np.zeros(len(items), np.int32)
    answers = {k: [None] * len(items) for k in ks} if ks is not None else None
    for bi, idx in enumerate(plan):
        batch = prepare_batch(bundle, [items[i] for i in idx], rows=int(batch_size), length_bucket=length_bucket,
                              pad_square=pad_square)
        f, t = batch_features(model, batch.input_ids, batch.pixel_values, batch.attention_mask, **batch.image_kw)
        for r, i in enumerate(idx):
            feats[i], nxt[i] = f[r], t[r]
        if ks is not None:
            got = generate_batch(bundle, batch, ks, max_new, length_bucket)
            for k in ks:
                for r, i in enumerate(idx):
                    answers[k][i] = got[k][r][0]
        if progress:
            progress(f"batch {bi + 1}/{len(plan)}: {sum(len(b) for b in plan[:bi + 1])} of {len(items)} items")
    return ProbeFeatures(features=np.stack(feats), targets=targets, ids=[it.id for it in items],
                         groups=[os.path.abspath(it.image) for it in items], next_token=nxt,
                         seconds=time.perf_counter() - t0, truncation=answers)


# --------------------------------------------------------------------------- splits and intervals


def wilson_interval(correct, n, z: float = Z95):
    """Wilson score interval of a proportion correct / n (arrays broadcast): (low, high); (0, 1) where
    n = 0."""
    correct, n = np.asarray(correct, np.float64), np.asarray(n, np.float64)
    safe = np.maximum(n, 1)
    p = correct / safe
    denom = 1 + z * z / safe
    centre = (p + z * z / (2 * safe)) / denom
    half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / denom
    low, high = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    return np.where(n > 0, low, 0.0), np.where(n > 0, high, 1.0)


def split_items(n: int, train_fraction: float = 0.5, seed: int = 0, groups=None) -> np.ndarray:
    """(n,) bool train mask: a seeded random share ``train_fraction`` of the items (of the groups, when
    ``groups`` gives one key per item: a group's items are all train or all test), at least one of
    each side."""
    if not 0 < train_fraction < 1:
        raise ProbeError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction!r}")
    keys = list(range(n)) if groups is None else list(groups)
    if len(keys) != n:
        raise ProbeError(f"{len(keys)} groups for {n} items")
    uniq = list(dict.fromkeys(keys))
    if len(uniq) < 2:
        raise ProbeError("need at least two items (groups) to split into train and test")
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_train = min(max(int(round(train_fraction * len(uniq))), 1), len(uniq) - 1)
    train_keys = {uniq[j] for j in order[:n_train]}
    return np.asarray([k in train_keys for k in keys], bool)


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class ProbeResult:
    names: list  # probe names, in the order of the arrays' first axis
    groups: list  # the group of each probe (PROBE_GROUPS)
    classes: list  # class names per probe
    accuracy: np.ndarray  # (P, L+1) held-out accuracy per probe and layer
    ci_low: np.ndarray  # (P, L+1) Wilson 95% interval
    ci_high: np.ndarray
    train_accuracy: np.ndarray  # (P, L+1)
    chance: np.ndarray  # (P,) the training majority class's accuracy on the test items
    n_train: np.ndarray  # (P,) labelled items on each side
    n_test: np.ndarray
    train: np.ndarray  # (N,) bool: the split
    weights: np.ndarray  # (P, L+1, D, K-1) in standardised units (K: the most classes of any probe)
    bias: np.ndarray  # (P, L+1, K-1)
    mean: np.ndarray  # (L+1, D) the training items' mean and standard deviation
    std: np.ndarray
    settings: dict  # steps, lr, weight_decay, seed, train_fraction, ...

    def index(self, name: str) -> int:
        return self.names.index(name)

    def predict(self, features) -> np.ndarray:
        """(P, N, L+1) predicted class index of every probe at every layer for new features (N, L+1, D)."""
        z = (np.asarray(features, np.float32) - self.mean) / self.std
        logits = np.einsum("nld,pldk->plnk", z, self.weights) + self.bias[:, :, None]
        full = np.concatenate([np.zeros(logits.shape[:-1] + (1,), logits.dtype), logits], -1)
        for p, cls in enumerate(self.classes):
            full[p, ..., len(cls):] = -np.inf
        return full.argmax(-1).transpose(0, 2, 1)

    def to_json(self) -> list[dict]:
        out = []
        for p, name in enumerate(self.names):
            acc = self.accuracy[p]
            out.append({"name": name, "group": self.groups[p], "classes": list(self.classes[p]),
                        "n_train": int(self.n_train[p]), "n_test": int(self.n_test[p]),
                        "chance": float(self.chance[p]), "accuracy": [float(v) for v in acc],
                        "ci_low": [float(v) for v in self.ci_low[p]], "ci_high": [float(v) for v in self.ci_high[p]],
                        "train_accuracy": [float(v) for v in self.train_accuracy[p]],
                        "best_layer": int(np.argmax(acc))})
        return out


@partial(jax.jit, static_argnames=("steps",))
def _train_jit(x, y, kvalid, train, steps, lr, weight_decay):
    """x (N, Lp, D); y (P, N) int (-1: none); kvalid (P, K) bool; train (N,) bool."""
    import optax

    n, lp, d = x.shape
    p, k = kvalid.shape
    wt = train.astype(jnp.float32)
    cnt = jnp.maximum(wt.sum(), 1.0)
    mean = jnp.einsum("n,nld->ld", wt, x) / cnt
    var = jnp.einsum("n,nld->ld", wt, (x - mean) ** 2) / cnt
    std = jnp.sqrt(var)
    # a dimension constant on the training items (to float precision) is only centred, not blown up
    scale = jnp.einsum("n,nld->l", wt, jnp.abs(x))[:, None] / (cnt * d) + 1e-30
    std = jnp.where(std > 1e-6 * scale, std, 1.0)
    z = ((x - mean) / std).transpose(1, 0, 2)  # (Lp, N, D)
    valid = y >= 0
    sw = (valid & train[None]).astype(jnp.float32)  # (P, N) the training labels each probe uses
    yc = jnp.maximum(y, 0)

    def logits_of(w, b, zl, kv):  # one (probe, layer): (N, K) with class 0 fixed at 0, absent classes -inf
        lg = zl @ w + b
        full = jnp.concatenate([jnp.zeros((zl.shape[0], 1), lg.dtype), lg], -1)
        return jnp.where(kv, full, -1e30)

    def nll(w, b, zl, yp, kv, swp):
        full = logits_of(w, b, zl, kv)
        ll = jnp.take_along_axis(full, yp[:, None], -1)[:, 0] - jax.nn.logsumexp(full, -1)
        return -(ll * swp).sum() / jnp.maximum(swp.sum(), 1.0) + 0.5 * weight_decay * (w * w).sum()

    # vmap over layers (weights' axis 1 after the probe axis is mapped; features' axis 0), then probes
    per_layer = jax.vmap(nll, in_axes=(0, 0, 0, None, None, None))
    per_probe = jax.vmap(per_layer, in_axes=(0, 0, None, 0, 0, 0))

    def loss(params):
        return per_probe(params["w"], params["b"], z, yc, kvalid, sw).sum()

    params = {"w": jnp.zeros((p, lp, d, k - 1), jnp.float32), "b": jnp.zeros((p, lp, k - 1), jnp.float32)}
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    state = opt.init(params)

    def step(carry, _):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    (params, _), losses = jax.lax.scan(step, (params, state), None, length=steps)
    pred_fn = jax.vmap(jax.vmap(lambda w, b, zl, kv: logits_of(w, b, zl, kv).argmax(-1),
                                in_axes=(0, 0, 0, None)), in_axes=(0, 0, None, 0))
    pred = pred_fn(params["w"], params["b"], z, kvalid)  # (P, Lp, N)
    hit = (pred == yc[:, None, :]) & valid[:, None, :]
    test = valid & ~train[None]
    return {"correct_test": (hit & ~train[None, None]).sum(-1), "correct_train": (hit & train[None, None]).sum(-1),
            "n_test": test.sum(-1), "n_train": (valid & train[None]).sum(-1), "w": params["w"], "b": params["b"],
            "mean": mean, "std": std, "losses": losses}


def _as_targets(labels) -> list[ProbeTarget]:
    if isinstance(labels, ProbeTarget):
        return [labels]
    if isinstance(labels, dict):
        out = []
        for name, t in labels.items():
            if isinstance(t, ProbeTarget):
                out.append(t)
            else:
                a = np.asarray(t)
                if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                    raise ProbeError(f"labels of {name!r} must be a 1-D integer array (class index, -1: none)")
                out.append(ProbeTarget(str(name), a.astype(np.int32), tuple(str(c) for c in range(max(a.max() + 1, 2))),
                                       "answer"))
        return out
    return _as_targets({"answer": labels})


def train_probes(features, labels, *, train_fraction: float = 0.5, split=None, groups=None, steps: int = 500,
                 lr: float = 0.1, weight_decay: float = 1e-3, seed: int = 0) -> ProbeResult:
    """One L2-regularised logistic-regression probe per (target, layer), all trained in one jitted
    optax loop; held-out accuracy with a 95% Wilson interval (module docstring).

    features (N, L+1, D) (`ProbeFeatures.features`); labels: {name: ProbeTarget or (N,) int class
    index (-1: no label)}, or one (N,) array (named "answer"). split: an (N,) bool train mask; else
    `split_items(N, train_fraction, seed, groups)`. steps, lr: full-batch Adam with cosine decay;
    weight_decay: the L2 penalty (weight_decay / 2) * ||w||^2 on standardised features.
    """
    x = np.asarray(features, np.float32)
    if x.ndim != 3:
        raise ProbeError(f"features must be (N, layers, D), got shape {x.shape}")
    n = x.shape[0]
    targets = _as_targets(labels)
    if not targets:
        raise ProbeError("no probe targets")
    for t in targets:
        if t.labels.shape != (n,):
            raise ProbeError(f"labels of {t.name!r} have shape {t.labels.shape}, expected ({n},)")
        if t.labels.max(initial=-1) >= len(t.classes):
            raise ProbeError(f"labels of {t.name!r} index past its {len(t.classes)} classes")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ProbeError(f"steps must be a positive integer, got {steps!r}")
    if not (lr > 0 and np.isfinite(lr)) or not (weight_decay >= 0 and np.isfinite(weight_decay)):
        raise ProbeError(f"lr must be > 0 and weight_decay >= 0, got {lr!r} and {weight_decay!r}")
    if split is None:
        train = split_items(n, train_fraction, seed, groups)
    else:
        train = np.asarray(split, bool)
        if train.shape != (n,) or train.all() or not train.any():
            raise ProbeError(f"split must be an ({n},) bool train mask with items on both sides")
    k = max(len(t.classes) for t in targets)
    y = np.stack([t.labels for t in targets]).astype(np.int32)
    kvalid = np.stack([np.arange(k) < len(t.classes) for t in targets])
    r = jax.device_get(_train_jit(jnp.asarray(x), jnp.asarray(y), jnp.asarray(kvalid), jnp.asarray(train),
                                  int(steps), jnp.float32(lr), jnp.float32(weight_decay)))
    n_test, n_train = np.asarray(r["n_test"]), np.asarray(r["n_train"])
    acc = np.asarray(r["correct_test"]) / np.maximum(n_test, 1)[:, None]
    low, high = wilson_interval(np.asarray(r["correct_test"]), n_test[:, None])
    chance = np.zeros(len(targets))
    for p, t in enumerate(targets):
        tr, te = t.labels[train & (t.labels >= 0)], t.labels[~train & (t.labels >= 0)]
        if len(te):
            major = np.bincount(tr, minlength=len(t.classes)).argmax() if len(tr) else 0
            chance[p] = float((te == major).mean())
    settings = {"steps": int(steps), "lr": float(lr), "weight_decay": float(weight_decay), "seed": int(seed),
                "train_fraction": None if split is not None else float(train_fraction),
                "split": "given" if split is not None else ("by group" if groups is not None else "by item"),
                "final_loss": float(np.asarray(r["losses"])[-1]),
                "optimizer": "optax.adam, full batch, cosine-decayed learning rate",
                "objective": "mean cross-entropy + weight_decay/2 * ||w||^2 on standardised features",
                "ci": CI_DEFINITION}
    return ProbeResult(names=[t.name for t in targets], groups=[t.group for t in targets],
                       classes=[tuple(t.classes) for t in targets], accuracy=acc, ci_low=low, ci_high=high,
                       train_accuracy=np.asarray(r["correct_train"]) / np.maximum(n_train, 1)[:, None],
                       chance=chance, n_train=n_train, n_test=n_test, train=train, weights=np.asarray(r["w"]),
                       bias=np.asarray(r["b"]), mean=np.asarray(r["mean"]), std=np.asarray(r["std"]),
                       settings=settings)


# --------------------------------------------------------------------------- what the script does


@dataclasses.dataclass
class ProbeRun:
    summary: dict  # what probes.json holds
    result: ProbeResult
    features: ProbeFeatures
    out: str
    files: dict  # name -> path: json, figure, features


def _truncation_summary(items, answers: dict, dataset: str, model: str, L: int, epsilon: float) -> dict:
    """The truncation curve of the items' decoded answers {K: [text]}: every metric of
    `jaxflow.metrics.score` per K, the primary metric's cliff layer (`build_summary`, as evaluate.py)."""
    from jaxflow.evaluation.cliff import build_summary
    from jaxflow.metrics import PRIMARY_METRIC, score

    ks = sorted(answers)
    metrics = {k: score(dataset, {it.id: a for it, a in zip(items, answers[k])}, items) for k in ks}
    s = build_summary(dataset=dataset, model=model, num_layers=L, layers=ks, metrics_per_layer=metrics,
                      primary_metric=PRIMARY_METRIC[dataset], epsilon=float(epsilon), n_items=len(items),
                      sweep="all" if ks == list(range(L + 1)) else "k" + "-".join(map(str, ks)))
    s.pop("cliff_definition", None)
    return s


def _model_answer_accuracy(bundle, items, next_token, train) -> dict | None:
    """Yes/no and letter sets: the model's own first-token answer (from feature row L), scored."""
    from jaxflow.evaluation.runner import item_score

    dataset = items[0].dataset
    if dataset not in ("pope", "toy_pope", "scienceqa"):
        return None
    texts = [bundle.tokenizer.decode([int(t)], skip_special_tokens=True).strip() for t in next_token]
    s = np.asarray([item_score(dataset, t, it) for t, it in zip(texts, items)])
    return {"all": float(s.mean()), "test": float(s[~train].mean()) if (~train).any() else None,
            "definition": "the model's greedy first answer token, scored as the data set's answers"}


def run_probes(checkpoint=None, dataset: str = "toy_pope", *, out: str, mesh=None, rules: str = "tp", data_dir=None, image_dir=None,
               limit=None, toy_n: int = 100, seed: int = 0, options=None, batch_size: int = 16,
               train_fraction: float = 0.5, steps: int = 500, lr: float = 0.1, weight_decay: float = 1e-3,
               probe_seed: int = 0, cliff: bool = True, epsilon: float = 0.01, max_new_tokens=None, template=None,
               pad_square: bool = False, dtype=None, overwrite: bool = False, progress=None,
               bundle=None) -> ProbeRun:
    """What scripts/probes.py does: features of every item of a data set, probes at every layer,
    probes.json, probes.png (accuracy against layer, the truncation cliff layer of the same items
    marked) and features.npz in ``out`` (published by `jaxflow.outputs`: a folder holding files
    jaxflow did not write is refused unless ``overwrite``).

    Data: ``data_dir``/``image_dir`` of the data set, or neither: the toy sets are generated
    (``toy_n`` questions per POPE split / captions, ``seed``) and the benchmarks' bundled fixtures
    written, under ``out/toy_data`` or ``out/fixtures`` (as scripts/evaluate.py does). cliff: decode
    every item's answer under every cut layer K from the same batches (`probe_features(truncation=
    "all")`, i.e. what evaluate.py --sweep all computes, without its files) and mark the cliff layer of
    the data set's primary metric (tolerance ``epsilon``). Raises ProbeError (one line) on bad input.
    """
    import shutil

    from jaxflow.convert import CheckpointError
    from jaxflow.data.datasets import DATASETS, DatasetError, load_dataset
    from jaxflow.outputs import check_out_dir, publish, staging_dir
    from jaxflow.pipeline import load_bundle, write_json

    t_start = time.time()

    def say(msg):
        if progress:
            progress(f"[{time.time() - t_start:6.1f}s] {msg}")

    if dataset not in DATASETS:
        raise ProbeError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if (data_dir is None) != (image_dir is None):
        raise ProbeError("--data_dir and --image_dir go together (give both, or neither for generated / bundled data)")
    if data_dir is not None and not os.path.exists(data_dir):
        raise ProbeError(f"--data_dir not found: {data_dir}")
    if image_dir is not None and not os.path.isdir(image_dir):
        raise ProbeError(f"--image_dir is not a directory: {image_dir}")
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ProbeError(f"--checkpoint directory not found: {checkpoint}")
    for name, v, lo in (("batch_size", batch_size, 1), ("steps", steps, 1), ("toy_n", toy_n, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise ProbeError(f"--{name} must be a positive integer, got {v!r}")
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 2):
        raise ProbeError(f"--limit must be an integer >= 2 (a train and a test item), got {limit!r}")
    if not 0 < train_fraction < 1:
        raise ProbeError(f"--train_fraction must lie strictly between 0 and 1, got {train_fraction!r}")
    if not lr > 0 or not weight_decay >= 0 or not epsilon >= 0:
        raise ProbeError("--lr must be > 0, --weight_decay and --epsilon >= 0")
    final = check_out_dir(out, overwrite=overwrite, error=ProbeError)
    if bundle is None:
        say(f"loading {'the embedded toy model' if checkpoint is None else checkpoint}")
        try:
            bundle = load_bundle(checkpoint, template=template, dtype=dtype, mesh=mesh, rules=rules)
        except (CheckpointError, OSError) as e:
            raise ProbeError(str(e)) from None
    elif template is not None and template != bundle.template:
        bundle = dataclasses.replace(bundle, template=template)
    tmp = staging_dir(final, error=ProbeError)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes `out`
        generated = None
        if data_dir is None:
            if dataset in ("toy_pope", "toy_caption"):
                from jaxflow.toy.sets import write_toy_captions, write_toy_pope

                say(f"generating the {dataset} set ({toy_n} {'per POPE split' if dataset == 'toy_pope' else 'images'}, "
                    f"seed {seed})")
                writer = write_toy_pope if dataset == "toy_pope" else write_toy_captions
                data_dir, image_dir = writer(os.path.join(tmp, "toy_data"), int(toy_n), int(seed))
                generated = "toy_data"
            else:
                from jaxflow.data.fixtures import write_fixtures

                data_dir, image_dir = write_fixtures(os.path.join(tmp, "fixtures"))[dataset]
                generated = "fixtures"
        try:
            ds = load_dataset(dataset, data_dir, image_dir, limit=limit, seed=seed, **dict(options or {}))
        except TypeError as e:
            raise ProbeError(str(e)) from None
        except (DatasetError, OSError) as e:
            raise ProbeError(str(e)) from None
        items = list(ds.items)
        if len(items) < 2:
            raise ProbeError(f"{dataset}: {len(items)} item(s) in {data_dir}; probes need a train and a test item")
        boxes = None
        if dataset == "toy_pope":
            cand = os.path.join(data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir), "boxes.jsonl")
            boxes = cand if os.path.isfile(cand) else None
        L = int(bundle.config.text.num_layers)
        say(f"{len(items)} items: features at the last prompt token, {L + 1} rows each"
            + (f"; answers under every cut layer K = 0..{L}" if cliff else ""))
        try:
            feats = probe_features(bundle, items, batch_size=batch_size, pad_square=pad_square, boxes=boxes,
                                   truncation="all" if cliff else None, max_new_tokens=max_new_tokens,
                                   progress=say)
        except (OSError, ValueError) as e:
            raise ProbeError(str(e)) from None
        say(f"training {len(feats.targets)} probe(s) x {L + 1} layers")
        t0 = time.perf_counter()
        res = train_probes(feats.features, feats.targets, train_fraction=train_fraction, groups=feats.groups,
                           steps=steps, lr=lr, weight_decay=weight_decay, seed=probe_seed)
        t_train = time.perf_counter() - t0
        trunc = (_truncation_summary(items, feats.truncation, dataset, bundle.name, L, epsilon)
                 if feats.truncation is not None else None)
        summary = {
            "model": bundle.name, "family": bundle.family, "dataset": dataset, "n_items": len(items),
            "num_layers": L, "hidden_size": int(feats.features.shape[-1]), "feature": FEATURE_DEFINITION,
            "layers": list(range(L + 1)),
            "split": {"by": "image", "train_fraction": float(train_fraction), "seed": int(probe_seed),
                      "n_train": int(res.train.sum()), "n_test": int((~res.train).sum())},
            "training": {k: v for k, v in res.settings.items() if k not in ("train_fraction", "split")},
            "probes": res.to_json(),
            "model_answer": _model_answer_accuracy(bundle, items, feats.next_token, res.train),
            "truncation": trunc, "cliff_layer": None if trunc is None else trunc["cliff_layer"],
            "seconds": {"features_and_truncation" if cliff else "features": round(feats.seconds, 3),
                        "training": round(t_train, 3)},
            "params": {"checkpoint": None if checkpoint is None else os.path.abspath(checkpoint),
                       "data_dir": generated or os.path.abspath(data_dir),
                       "image_dir": generated or os.path.abspath(image_dir), "limit": limit, "seed": int(seed),
                       "toy_n": int(toy_n) if generated == "toy_data" else None, "batch_size": int(batch_size),
                       "template": bundle.template, "pad_square": bool(pad_square), "dtype": dtype,
                       "epsilon": float(epsilon), "options": dict(options or {})},
        }
        files = {"json": os.path.join(final, "probes.json"), "figure": os.path.join(final, "probes.png"),
                 "features": os.path.join(final, "features.npz")}
        write_json(os.path.join(tmp, "probes.json"), summary)
        from jaxflow.viz.probes import plot_probes

        plot_probes(summary, os.path.join(tmp, "probes.png"))
        arrays = {"features": feats.features, "ids": np.asarray(feats.ids), "train": res.train,
                  "next_token": feats.next_token, "probe_names": np.asarray(res.names)}
        for t in feats.targets.values():
            arrays[f"labels/{t.name}"] = t.labels
        np.savez_compressed(os.path.join(tmp, "features.npz"), **arrays)
        say("writing probes.json, probes.png and features.npz")
        publish(tmp, final, overwrite=overwrite, error=ProbeError)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ProbeRun(summary=summary, result=res, features=feats, out=final, files=files)
