"""The evaluation runner: a data set, a model and a sweep of cut layers in, per-item predictions,
a summary, a CSV and a figure out; resumable.

    from jaxflow.evaluation import EvalConfig, run_evaluation
    res = run_evaluation(EvalConfig(dataset="pope", out="outputs/eval/pope"))   # fixtures + the embedded toy model
    res.summary["cliff_layer"], res.summary["per_layer"]

Batching. Items are ordered by prompt length, longest first (ties in data-set order), and cut into
batches of ``batch_size``: a fixed plan that depends only on the items, the tokenizer and the batch
size, so a resumed run rebuilds the same batches. In a batch every row is laid out so that its image
block ends at the same column P (left padding before the system prompt) and its text after the image
ends at the last column (masked gaps between the image and the text, which positions and attention
skip: positions count real tokens only). The text region is rounded up to a multiple of
``length_bucket`` and a short last batch is filled with copies of its first row (their outputs are
dropped), so batches share a few shapes and XLA compiles the program only a few times.

Generation. ``--sweep all`` or a list of K runs ``truncation_generate`` (every K from one pass; the
untruncated K = L is always included: it is the baseline), ``--sweep none`` runs plain ``generate``
and records its answers under K = L. Greedy decoding, at most ``max_new_tokens`` per answer.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxflow.data.datasets.questions import template_question
from jaxflow.evaluation.cliff import REPORT_HTML, build_summary, load_summary, plot_curve, write_report, write_summary
from jaxflow.evaluation.records import (CURVE_PNG, PREDICTIONS, EvaluationError, PredictionLog, RunLock,
                                        host_predictions, known_records, merge_predictions, open_run_dir,
                                        precheck_run_dir, read_records, unique_records)

log = logging.getLogger("jaxflow.evaluation")

DATASETS = ("pope", "textvqa", "scienceqa", "chair", "toy_pope", "toy_caption")
TOY_DATASETS = ("toy_pope", "toy_caption")  # generated held-out toy shapes sets (jaxflow.toy.sets)
# Short answers for the VQA sets (LLaVA-1.5 answers "Yes" / "B" / a word or two, then EOS); CHAIR
# captions are long. Override with max_new_tokens.
DEFAULT_MAX_NEW_TOKENS = {"pope": 8, "textvqa": 16, "scienceqa": 8, "chair": 128, "toy_pope": 4, "toy_caption": 24}


@dataclasses.dataclass
class EvalConfig:
    """What to evaluate and where to write it (the flags of scripts/evaluate.py).

    dataset: pope | textvqa | scienceqa | chair | toy_pope | toy_caption. checkpoint: a jaxflow
    checkpoint directory (None: the embedded toy model, jaxflow/assets/toy_llava). data_dir / image_dir: the data
    set's files (both None: the bundled fixtures, written under ``out/fixtures``; for the toy sets,
    ``options["n"]`` (default 100) questions per POPE split or captions generated with ``seed``
    under ``out/toy_data``). sweep: "all" (K = 0..L), "none" (the plain
    model only) or cut layers ("0,8,16" or a sequence of ints; L is added). out: the run directory
    (None: ``outputs/eval/{model}/{dataset}-{sweep}``). limit: the first N items. options: data-set
    loader options (pope: splits, source; textvqa: ocr; chair: n_images; toy_pope: splits, n;
    toy_caption: n). template None: the checkpoint's own (``pipeline.default_template``). epsilon:
    the cliff tolerance. protocol: the scoring protocol of the summary (llava | lmms | corrected,
    `jaxflow.metrics`); it does not change the predictions, so saved predictions can be rescored
    under another with `rescore_run`. mesh: shard the model over this process's devices,
    "data:N,model:M" (`jaxflow.sharding.make_mesh`; None: one device); sharding: its rules, tp | fsdp.
    Only batch_size, epsilon, length_bucket, progress, protocol, mesh, sharding and overwrite may
    change between a run and its resumption; the rest must match run.json.
    """

    dataset: str
    checkpoint: str | None = None
    data_dir: str | None = None
    image_dir: str | None = None
    out: str | None = None
    sweep: str | Sequence[int] = "all"
    batch_size: int = 8
    limit: int | None = None
    max_new_tokens: int | None = None
    epsilon: float = 0.01
    skip_bad: bool = False
    overwrite: bool = False
    template: str | None = None
    pad_square: bool = False
    dtype: str | None = None
    seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)
    length_bucket: int = 16
    progress: bool = True
    protocol: str = "llava"
    mesh: str | None = None
    sharding: str = "tp"


@dataclasses.dataclass
class EvalResult:
    summary: dict
    out: str
    files: dict  # name -> path: predictions, run, summary_json, summary_csv, figure, report (report.html)
    items_run: int  # items generated by this call (0 when everything was already done)
    seconds: float  # wall time of this call's generation loop
    skipped: list  # [(id, reason)] items dropped at run time (unreadable image, with skip_bad)


@dataclasses.dataclass
class PreparedBatch:
    """A batch ready for the model. ``items`` are the real rows (first ``len(items)`` rows)."""

    items: list
    input_ids: np.ndarray  # (rows, T) int32
    attention_mask: np.ndarray  # (rows, T) int32
    pixel_values: np.ndarray  # the family's pixels of the rows' images, in row order, float32
    image_kw: dict = dataclasses.field(default_factory=dict)  # the family's image arguments (Qwen2-VL: image_grid_thw)


# --------------------------------------------------------------------------- arguments


def parse_sweep(spec) -> str | tuple[int, ...]:
    """"all" | "none" | a comma-separated list of cut layers (or a sequence of ints) -> "all",
    "none" or a sorted tuple of distinct ints >= 0 (checked against the model's L later)."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("all", "none"):
            return s
        parts = [p.strip() for p in s.split(",")]
        try:
            ks = [int(p) for p in parts]
        except ValueError:
            ks = None
        if not ks or any(p == "" for p in parts):
            raise EvaluationError(f"--sweep must be all, none or comma-separated cut layers (e.g. 0,8,16), "
                                  f"got {spec!r}")
    else:
        try:
            ks = [int(k) for k in spec]
        except (TypeError, ValueError):
            raise EvaluationError(f"sweep must be 'all', 'none' or cut layers, got {spec!r}") from None
        if not ks:
            raise EvaluationError("sweep: the list of cut layers is empty")
    if any(k < 0 for k in ks):
        raise EvaluationError(f"--sweep: cut layers must be >= 0, got {spec!r}")
    return tuple(sorted(set(ks)))


def resolve_layers(sweep, num_layers: int) -> list[int] | None:
    """The cut layers a sweep evaluates for a model with num_layers decoder layers (None for
    "none"); a list always ends with L (the untruncated baseline)."""
    sweep = parse_sweep(sweep)
    if sweep == "none":
        return None
    if sweep == "all":
        return list(range(num_layers + 1))
    bad = [k for k in sweep if k > num_layers]
    if bad:
        raise EvaluationError(f"--sweep: cut layer(s) {bad} out of range 0..{num_layers} "
                              f"(the model has {num_layers} decoder layers; K = {num_layers} is untruncated)")
    return sorted(set(sweep) | {num_layers})


def sweep_tag(sweep) -> str:
    sweep = parse_sweep(sweep)
    return sweep if isinstance(sweep, str) else "k" + "-".join(str(k) for k in sweep)


def model_name(checkpoint: str | None) -> str:
    from jaxflow.pipeline import checkpoint_name

    return checkpoint_name(checkpoint)


def default_out(cfg: EvalConfig) -> str:
    return os.path.join("outputs", "eval", model_name(cfg.checkpoint), f"{cfg.dataset}-{sweep_tag(cfg.sweep)}")


def check_config(cfg: EvalConfig) -> None:
    """Every check that needs no model and no data; raises EvaluationError (one line)."""
    if cfg.dataset not in DATASETS:
        raise EvaluationError(f"--dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    parse_sweep(cfg.sweep)
    if not isinstance(cfg.batch_size, (int, np.integer)) or cfg.batch_size < 1:
        raise EvaluationError(f"--batch_size must be a positive integer, got {cfg.batch_size!r}")
    if cfg.limit is not None and (not isinstance(cfg.limit, (int, np.integer)) or cfg.limit < 1):
        raise EvaluationError(f"--limit must be a positive integer, got {cfg.limit!r}")
    if cfg.max_new_tokens is not None and (not isinstance(cfg.max_new_tokens, (int, np.integer))
                                           or cfg.max_new_tokens < 1):
        raise EvaluationError(f"--max_new_tokens must be a positive integer, got {cfg.max_new_tokens!r}")
    if not isinstance(cfg.epsilon, (int, float)) or not np.isfinite(cfg.epsilon) or cfg.epsilon < 0:
        raise EvaluationError(f"--epsilon must be a number >= 0, got {cfg.epsilon!r}")
    if not isinstance(cfg.length_bucket, (int, np.integer)) or cfg.length_bucket < 1:
        raise EvaluationError(f"length_bucket must be a positive integer, got {cfg.length_bucket!r}")
    if (cfg.data_dir is None) != (cfg.image_dir is None):
        given, missing = ("--data_dir", "--image_dir") if cfg.image_dir is None else ("--image_dir", "--data_dir")
        raise EvaluationError(f"{given} needs {missing} too (give both, or neither for the bundled fixtures)")
    if cfg.data_dir is not None and not os.path.exists(cfg.data_dir):
        raise EvaluationError(f"--data_dir not found: {cfg.data_dir}")
    if cfg.image_dir is not None and not os.path.isdir(cfg.image_dir):
        raise EvaluationError(f"--image_dir is not a directory: {cfg.image_dir}")
    if cfg.checkpoint is not None and not os.path.isdir(cfg.checkpoint):
        raise EvaluationError(f"--checkpoint directory not found: {cfg.checkpoint}")
    from jaxflow.data.prompts import TEMPLATES

    if cfg.template is not None and cfg.template not in TEMPLATES:
        raise EvaluationError(f"--template must be one of {', '.join(TEMPLATES)}, got {cfg.template!r}")
    _check_protocol(cfg.protocol)
    _check_mesh(cfg.mesh, cfg.sharding)
    if cfg.dataset == "scienceqa" and cfg.options.get("with_text_only"):
        raise EvaluationError("with_text_only: the runner evaluates problems with an image; score text-only "
                              "problems' predictions with jaxflow.metrics.score")


def _check_mesh(mesh, sharding) -> None:
    from jaxflow.sharding import MeshError, check_rules, parse_mesh

    try:
        check_rules(sharding)
        if mesh is not None:
            parse_mesh(mesh)
    except MeshError as e:
        raise EvaluationError(str(e)) from None


def _check_protocol(protocol) -> None:
    from jaxflow.metrics import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise EvaluationError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


# --------------------------------------------------------------------------- batching


def prompt_lengths(bundle, items) -> np.ndarray:
    """Tokens of each item's prompt (image placeholder expanded), as the model will see it."""
    from jaxflow.pipeline import format_prompts

    prompts = format_prompts(bundle, [template_question(it, bundle.template) for it in items])
    if not prompts:
        return np.zeros(0, np.int64)
    ids = bundle.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    # image tokens of one image (LLaVA), one tile (InternVL: the tile count needs the image itself) or at
    # least one (Qwen2-VL: the count depends on the image's size); the order of the batches only
    cfg = bundle.config
    per_image = getattr(cfg, "num_image_tokens", None) or getattr(cfg, "tokens_per_tile", 1)
    return np.asarray([len(x) for x in ids], np.int64) + per_image - 1


def plan_batches(lengths, batch_size: int) -> list[list[int]]:
    """Item indices in batches: longest prompts first (so memory trouble shows in the first batch),
    ties in data-set order. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def layout_rows(input_ids, attention_mask, image_token_id: int, pad_id: int, *, rows: int | None = None,
                length_bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Re-lay a padded batch (one image block per row) so every image block ends at the same column
    P and every row's text after the image ends at the last column; the text region is rounded up
    to a multiple of length_bucket, and rows are filled up to ``rows`` with copies of row 0.

    Returns (input_ids, attention_mask) int32 (rows, P + bucketed text). Real tokens keep their
    order and their positions (positions count real tokens only), so every row computes what it
    computes alone.
    """
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    heads, tails = [], []
    for r in range(ids.shape[0]):
        real = ids[r][mask[r] > 0]
        img = np.flatnonzero(real == image_token_id)
        if img.size == 0:
            raise ValueError(f"row {r} has no image token")
        end = int(img[-1]) + 1
        heads.append(real[:end])
        tails.append(real[end:])
    p = max(len(h) for h in heads)
    ta = max(len(t) for t in tails)
    ta = -(-ta // length_bucket) * length_bucket
    n = ids.shape[0] if rows is None else max(rows, ids.shape[0])
    out_ids = np.full((n, p + ta), pad_id, np.int32)
    out_mask = np.zeros((n, p + ta), np.int32)
    for r in range(n):
        h, t = heads[r if r < len(heads) else 0], tails[r if r < len(tails) else 0]
        out_ids[r, p - len(h):p], out_mask[r, p - len(h):p] = h, 1
        if len(t):
            out_ids[r, p + ta - len(t):], out_mask[r, p + ta - len(t):] = t, 1
    return out_ids, out_mask


def prepare_batch(bundle, items, *, rows: int, length_bucket: int = 16, pad_square: bool = False) -> PreparedBatch:
    """Encode items (images + prompts) into one batch of ``rows`` rows (see ``layout_rows``)."""
    from jaxflow.pipeline import encode

    batch, images = encode(bundle, [it.image for it in items], [template_question(it, bundle.template) for it in items],
                           pad_square=pad_square, with_images=True)
    cfg = bundle.config
    pad = cfg.text.pad_token_id if cfg.text.pad_token_id is not None else 0
    ids, mask = layout_rows(batch.input_ids, batch.attention_mask, cfg.image_token_id, pad, rows=rows,
                            length_bucket=length_bucket)
    n = len(items)
    idx = list(range(n)) + [0] * (ids.shape[0] - n)  # filler rows copy row 0 and its image
    return PreparedBatch(list(items), ids, mask, np.asarray(images.rows(idx), np.float32), images.kw_rows(idx))


def generate_batch(bundle, batch: PreparedBatch, layers, max_new_tokens: int,
                   text_bucket: int = 1) -> dict[int, list[tuple[str, int]]]:
    """Greedy answers of the batch's real rows: {K: [(text, generated tokens incl. EOS), ...]}.
    layers None: the plain model (``generate``), answers under K = L; else ``truncation_generate``
    over those cut layers in one pass."""
    from jaxflow.analysis.truncation import truncation_generate
    from jaxflow.generate import generate
    from jaxflow.pipeline import decode_answers

    cfg = bundle.config
    eos = tuple(int(e) for e in (cfg.text.eos_token_id or ()))
    n = len(batch.items)
    if layers is None:
        g = generate(bundle.model, batch.input_ids, batch.pixel_values, batch.attention_mask,
                     max_new_tokens=int(max_new_tokens), **batch.image_kw)
        texts = decode_answers(bundle.tokenizer, g.tokens[:n], g.lengths[:n], eos)
        return {cfg.text.num_layers: list(zip(texts, g.lengths[:n].tolist()))}
    g = truncation_generate(bundle.model, batch.input_ids, batch.pixel_values, batch.attention_mask,
                            layers=list(layers), max_new_tokens=int(max_new_tokens), text_bucket=int(text_bucket),
                            **batch.image_kw)
    out = {}
    for v, k in enumerate(g.layers):
        texts = decode_answers(bundle.tokenizer, g.tokens[v, :n], g.lengths[v, :n], eos)
        out[int(k)] = list(zip(texts, g.lengths[v, :n].tolist()))
    return out


# --------------------------------------------------------------------------- scoring


def item_score(dataset: str, prediction: str, item, protocol: str = "llava") -> float:
    """One item's score under a scoring protocol, the per-item value behind the data set's metrics:
    pope 1/0 correct; textvqa the VQA accuracy; scienceqa 1/0 correct letter; chair (and toy_caption)
    1/0 the caption mentions a hallucinated object (its CHAIR_s; lower is better); toy_pope as pope."""
    from jaxflow.metrics import parse_letter, parse_yes_no, vqa_accuracy

    if dataset in ("pope", "toy_pope"):
        return float(parse_yes_no(prediction, protocol=protocol) == item.answers[0].strip().lower())
    if dataset == "textvqa":
        return float(vqa_accuracy(prediction, list(item.answers), protocol=protocol)) if item.answers else 0.0
    if dataset == "scienceqa":
        n = len(item.metadata.get("choices", ())) or None
        return float(parse_letter(prediction, n, protocol=protocol) == item.answers[0].strip().upper())
    if dataset == "chair":
        from jaxflow.metrics.chair import analyse_caption, item_ground_truth

        gt = item_ground_truth(item, protocol=protocol)
        return float(bool(analyse_caption(prediction, gt, protocol=protocol)["hallucinated"]))
    if dataset == "toy_caption":
        from jaxflow.metrics import analyse_toy_caption

        return float(bool(analyse_toy_caption(prediction, item.answers)["hallucinated"]))
    raise ValueError(f"unknown data set {dataset!r}")


def score_run(dataset: str, records, items, layers, protocol: str = "llava") -> dict[int, dict]:
    """{K: metrics.score(...) over the items} from the (id, K) records, under a scoring protocol."""
    from jaxflow.metrics import score

    recs = unique_records(records)
    out = {}
    for k in layers:
        preds = {it.id: recs[(it.id, k)]["prediction"] for it in items}
        out[k] = score(dataset, preds, items, protocol=protocol)
    return out


# --------------------------------------------------------------------------- the run


def _items_digest(items) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it.id.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def _load_data(cfg: EvalConfig, out: str):
    from jaxflow.data.datasets import load_dataset

    options = dict(cfg.options)
    n_toy = options.pop("n", 100) if cfg.dataset in TOY_DATASETS else None
    if cfg.data_dir is None and cfg.dataset in TOY_DATASETS:
        from jaxflow.toy.sets import write_toy_captions, write_toy_pope

        if not isinstance(n_toy, (int, np.integer)) or n_toy < 1:
            raise EvaluationError(f"toy sets: n must be a positive integer, got {n_toy!r}")
        writer = write_toy_pope if cfg.dataset == "toy_pope" else write_toy_captions
        data_dir, image_dir = writer(os.path.join(out, "toy_data"), int(n_toy), cfg.seed)
    elif cfg.data_dir is None:
        from jaxflow.data.fixtures import write_fixtures

        data_dir, image_dir = write_fixtures(os.path.join(out, "fixtures"))[cfg.dataset]
    else:
        data_dir, image_dir = cfg.data_dir, cfg.image_dir
    try:
        ds = load_dataset(cfg.dataset, data_dir, image_dir, limit=cfg.limit, skip_bad=cfg.skip_bad, seed=cfg.seed,
                          **options)
    except TypeError as e:  # an option the loader does not take
        raise EvaluationError(str(e)) from None
    if not len(ds):
        raise EvaluationError(f"{cfg.dataset}: no items to evaluate in {data_dir} "
                              f"({ds.stats.records} records, {ds.stats.skipped} skipped, {ds.stats.filtered} filtered)")
    return ds


def _template(cfg: EvalConfig) -> str:
    from jaxflow.convert import CheckpointError
    from jaxflow.pipeline import default_template

    try:
        return cfg.template or default_template(cfg.checkpoint)
    except CheckpointError as e:
        raise EvaluationError(str(e)) from None


def run_params(cfg: EvalConfig, ds, max_new_tokens: int, num_layers: int | None = None) -> dict:
    """The parameters that decide the predictions (what run.json records and a resume must match).
    Without num_layers (before the model is loaded) the model-dependent entries are left out; with
    ds None (before the data is read) the data-dependent ones."""
    fixtures = cfg.data_dir is None
    params = {
        "dataset": cfg.dataset,
        "checkpoint": None if cfg.checkpoint is None else os.path.abspath(cfg.checkpoint),
        "model": model_name(cfg.checkpoint),
        "data_dir": "fixtures" if fixtures else os.path.abspath(cfg.data_dir),
        "image_dir": "fixtures" if fixtures else os.path.abspath(cfg.image_dir),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.options.items())},
        "seed": cfg.seed if cfg.dataset in ("chair",) + TOY_DATASETS else None,
        "limit": cfg.limit,
        "skip_bad": bool(cfg.skip_bad),
        "sweep": sweep_tag(cfg.sweep),
        "max_new_tokens": int(max_new_tokens),
        "template": _template(cfg),
        "pad_square": bool(cfg.pad_square),
        "dtype": cfg.dtype,
    }
    if ds is not None:
        params.update(n_items=len(ds), items_sha256=_items_digest(ds.items))
    if num_layers is not None:
        layers = resolve_layers(cfg.sweep, num_layers)
        params["num_layers"] = int(num_layers)
        params["layers"] = layers if layers is not None else [int(num_layers)]
    return params


def run_evaluation(cfg: EvalConfig, *, bundle=None, on_batch: Callable[[dict], None] | None = None) -> EvalResult:
    """Evaluate (or resume evaluating) one data set; writes predictions.jsonl as it goes, then
    summary.json, summary.csv and the figure. ``bundle``: an already loaded model bundle (its
    checkpoint must be cfg.checkpoint; sharded on cfg.mesh when given). ``on_batch(info)`` is called
    after each batch is on disk (info: batch, n_batches, items_done, n_items, records_written); an
    exception raised there stops the run like a kill would (the batches written so far stay).
    With several processes (``jax.process_count() > 1``) each runs its share of the batches and
    process 0 writes the shared files (`_run_multihost`)."""
    check_config(cfg)
    _template(cfg)  # a missing embedded checkpoint fails here, before anything is written
    out = cfg.out or default_out(cfg)
    max_new = int(cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[cfg.dataset])
    index, count = process_grid()
    if count > 1:
        return _run_multihost(cfg, out, max_new, bundle, on_batch, index, count)
    # A refused run changes nothing: its settings are compared with the folder's run before the lock,
    # and the generated data sets are (re)written only under the lock, after the data-independent
    # settings have been checked again.
    if not cfg.overwrite:
        precheck_run_dir(out, run_params(cfg, None, max_new))
    os.makedirs(out, exist_ok=True)
    with RunLock(out):
        ds = _load_checked(cfg, out, max_new)
        run = _open_run(cfg, out, ds, max_new, bundle, processes=1)
        merge_predictions(out, run.order)  # per-host files a multi-host run left behind (usually none)
        shard = _run_shard(cfg, run, run.files["predictions"], 0, 1, on_batch)
    return _finish(cfg, out, run, shard.records, shard.skipped, shard.items_run, shard.seconds)


def _load_checked(cfg: EvalConfig, out: str, max_new: int):
    """The data set, (re)written under the run folder's lock only once the settings that need no
    data match the folder's run; then the data-dependent ones are checked (before the model loads)."""
    if not cfg.overwrite:
        precheck_run_dir(out, run_params(cfg, None, max_new))
    ds = _load_data(cfg, out)
    if not cfg.overwrite:
        precheck_run_dir(out, run_params(cfg, ds, max_new))
    return ds


def _finish(cfg, out, run, records, skipped, n_run, seconds) -> EvalResult:
    """Scores the run's records and writes summary.json, summary.csv, the figure and report.html."""
    from jaxflow.metrics import PRIMARY_METRIC

    items, record_layers, ds, files = run.ds.items, run.record_layers, run.ds, dict(run.files)
    done = unique_records(records)
    scored = [it for it in items if all((it.id, k) in done for k in record_layers)]
    missing = len(items) - len(scored)
    if missing and not skipped:
        raise EvaluationError(f"{missing} item(s) have no prediction after the run; re-run to resume")
    if cfg.dataset == "textvqa" and scored and not any(it.answers for it in scored):
        return _submission_result(cfg, out, run.bundle, run.L, record_layers, records, scored, run.params, files,
                                  n_run, seconds, skipped)
    metrics = score_run(cfg.dataset, records, scored, record_layers, cfg.protocol)
    summary = build_summary(dataset=cfg.dataset, model=run.bundle.name, num_layers=run.L, layers=record_layers,
                            metrics_per_layer=metrics, primary_metric=PRIMARY_METRIC[cfg.dataset],
                            epsilon=float(cfg.epsilon), n_items=len(scored), sweep=sweep_tag(cfg.sweep),
                            params=run.params, extra={"protocol": cfg.protocol,
                                                      "skipped_at_run_time": [list(s) for s in skipped],
                                                      "load_stats": {"records": ds.stats.records,
                                                                     "skipped": ds.stats.skipped,
                                                                     "filtered": ds.stats.filtered}})
    write_summary(out, summary)
    plot_curve(summary, files["figure"])
    files["report"] = _write_report(cfg, out, summary, run.bundle, scored, records, record_layers, files)
    return EvalResult(summary=summary, out=out, files=files, items_run=n_run, seconds=seconds, skipped=skipped)


def _submission_result(cfg, out, bundle, L, record_layers, records, items, params, files, n_run, seconds,
                       skipped) -> EvalResult:
    """A split without answers (TextVQA test): no score, but the EvalAI upload file per cut layer K,
    submission_K{K}.json, and submission.json for the untruncated model (K = L)."""
    from jaxflow.evaluation.records import write_json_atomic
    from jaxflow.metrics import write_textvqa_submission

    recs = unique_records(records)
    subs = {}
    for k in record_layers:
        preds = {it.id: recs[(it.id, k)]["prediction"] for it in items}
        name = "submission.json" if k == L else f"submission_K{k}.json"
        subs[int(k)] = write_textvqa_submission(preds, items, os.path.join(out, name))
    summary = {"dataset": cfg.dataset, "model": bundle.name, "num_layers": L, "sweep": sweep_tag(cfg.sweep),
               "n_items": len(items), "layers": [int(k) for k in record_layers], "protocol": cfg.protocol,
               "submission": {str(k): os.path.basename(p) for k, p in subs.items()},
               "note": "a split without answers (TextVQA test): upload submission.json (K = L) or a "
                       "submission_K{K}.json to the EvalAI TextVQA challenge; nothing is scored here",
               "params": params, "skipped_at_run_time": [list(x) for x in skipped]}
    write_json_atomic(files["summary_json"], summary)
    files = {k: v for k, v in files.items() if k in ("predictions", "run", "summary_json")}
    files["submission"] = subs[L] if L in subs else next(iter(subs.values()))
    return EvalResult(summary=summary, out=out, files=files, items_run=n_run, seconds=seconds, skipped=skipped)


def rescore_run(out: str, protocol: str, *, data_dir: str | None = None, image_dir: str | None = None,
                epsilon: float | None = None) -> dict:
    """Scores a finished run's saved predictions under another scoring protocol, without the model:
    reads run.json and predictions.jsonl in `out`, loads the same items (the run's data files, or
    `data_dir`/`image_dir` where they have moved; the items must be the run's, checked by their
    digest) and writes summary.{protocol}.json and summary.{protocol}.csv beside the run's own
    summary (atomically; nothing else is written). epsilon: the cliff tolerance (default: the run's
    summary's). Returns that summary (with "protocol")."""
    from jaxflow.data.datasets import DatasetError
    from jaxflow.evaluation.records import RUN_JSON, SUMMARY_JSON, _read_run_json, read_records
    from jaxflow.metrics import PRIMARY_METRIC

    _check_protocol(protocol)
    run_path = os.path.join(out, RUN_JSON)
    if not os.path.isfile(run_path):
        raise EvaluationError(f"no run.json in {out}: rescoring needs a run folder of scripts/evaluate.py")
    params = _read_run_json(run_path)["params"]
    dataset = params["dataset"]
    if (data_dir is None) != (image_dir is None):
        raise EvaluationError("give both --data_dir and --image_dir (where the run's data files are now), or neither")
    if data_dir is None:
        data_dir, image_dir = params["data_dir"], params["image_dir"]
    cfg = EvalConfig(dataset=dataset, checkpoint=params.get("checkpoint"),
                     data_dir=None if data_dir == "fixtures" else data_dir,
                     image_dir=None if image_dir == "fixtures" else image_dir, limit=params.get("limit"),
                     skip_bad=bool(params.get("skip_bad")), seed=params.get("seed") or 0,
                     options=dict(params.get("options") or {}))
    try:
        if cfg.data_dir is None:  # bundled fixtures / generated toy data: the same files again, in a temporary folder
            import tempfile

            with tempfile.TemporaryDirectory(prefix="jaxflow-rescore-") as tmp:
                ds = _load_data(cfg, tmp)
        else:
            ds = _load_data(cfg, out)
    except (DatasetError, OSError) as e:
        raise EvaluationError(f"cannot load the run's items: {e}") from None
    if _items_digest(ds.items) != params.get("items_sha256"):
        raise EvaluationError(f"the items loaded from {data_dir} are not the run's (their digest differs from "
                              "run.json): point --data_dir/--image_dir at the run's data")
    records = read_records(os.path.join(out, PREDICTIONS))
    layers = [int(k) for k in params["layers"]]
    done = unique_records(records)
    scored = [it for it in ds.items if all((it.id, k) in done for k in layers)]
    if not scored:
        raise EvaluationError(f"{out} has no item with a prediction for every cut layer: finish the run first")
    metrics = score_run(dataset, records, scored, layers, protocol)
    L = int(params["num_layers"])
    if epsilon is None:  # the run's own tolerance, where its summary exists
        own = os.path.join(out, SUMMARY_JSON)
        epsilon = load_summary(own).get("epsilon", 0.01) if os.path.isfile(own) else 0.01
    summary = build_summary(dataset=dataset, model=params["model"], num_layers=L, layers=layers,
                            metrics_per_layer=metrics, primary_metric=PRIMARY_METRIC[dataset],
                            epsilon=float(epsilon), n_items=len(scored), sweep=params["sweep"], params=params,
                            extra={"protocol": protocol, "rescored_from": os.path.abspath(out)})
    write_summary(out, summary, stem=f"summary.{protocol}")
    return summary


def _write_report(cfg, out, summary, bundle, items, records, record_layers, files, n_examples: int = 10) -> str:
    """report.html beside summary.json: the summary's numbers and figure, the model, the settings, the
    first item's prompt as tokenised, the words of the prompts the tokenizer does not know and the
    first items' predictions at the untruncated and the smallest cut layer."""
    from jaxflow.pipeline import encode, format_prompts
    from jaxflow.viz import html_report as H

    settings = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in summary.get("params", {}).items()}
    settings.update(batch_size=int(cfg.batch_size), epsilon=float(cfg.epsilon), out=os.path.abspath(out))
    prompt = unknown = None
    if items:
        questions = [template_question(it, bundle.template) for it in items]
        try:
            batch, _ = encode(bundle, [items[0].image], [questions[0]], pad_square=cfg.pad_square)
            prompt = H.prompt_html(bundle.tokenizer, batch.input_ids[0], image_token_id=bundle.config.image_token_id,
                                   attention_mask=batch.attention_mask[0], texts=[questions[0]])
        except (OSError, ValueError) as e:
            prompt = H.note(f"the first item's prompt could not be encoded: {e}", "err")
        unknown = H.unknown_words_table(bundle.tokenizer, format_prompts(bundle, questions))
    recs = unique_records(records)
    ks = sorted({int(k) for k in record_layers})
    shown = [k for k in (ks[-1], ks[0]) if k in ks]
    shown = list(dict.fromkeys(shown))
    header = ["id", "question", "reference"] + [f"prediction, K = {k}" for k in shown]
    rows = []
    for it in items[:n_examples]:
        rows.append([str(it.id), it.question, ", ".join(map(str, it.answers[:3])) + (" ..." if len(it.answers) > 3 else "")]
                    + [recs.get((it.id, k), {}).get("prediction", "") for k in shown])
    model = H.model_facts(bundle, cfg.checkpoint)
    return write_report(out, summary, model=model, settings=settings, figure=files["figure"], prompt=prompt,
                        unknown=unknown, examples=(header, rows) if rows else None)


@dataclasses.dataclass
class _Run:
    """What every process of a run shares: the model, the items, the cut layers, the batch plan."""

    bundle: object
    ds: object
    params: dict
    layers: list | None  # None: --sweep none
    record_layers: list
    max_new: int
    plan: list  # item indices per batch, for the whole run
    files: dict
    resumed: int = 0

    @property
    def L(self) -> int:
        return int(self.bundle.config.text.num_layers)

    @property
    def order(self) -> list[tuple[str, int]]:
        """Every (id, K) of the run, in item order."""
        return [(str(it.id), int(k)) for it in self.ds.items for k in self.record_layers]

    @property
    def digest(self) -> str:
        """The parameters and the batch plan in a few characters: equal on every process of a run."""
        text = json.dumps([self.params, self.plan], sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class _Shard:
    records: list  # the records of the file this process appended to
    skipped: list
    items_run: int
    seconds: float


def _mesh(cfg: EvalConfig):
    """cfg.mesh over this process's devices, or None."""
    if not cfg.mesh:
        return None
    from jaxflow.sharding import MeshError, make_mesh

    try:
        return make_mesh(cfg.mesh)
    except MeshError as e:
        raise EvaluationError(str(e)) from None


def _load_model(cfg: EvalConfig, bundle):
    """The bundle to run: cfg.checkpoint loaded (sharded on cfg.mesh), or the caller's (its template
    set to the run's, sharded on cfg.mesh when given)."""
    from jaxflow.pipeline import load_bundle

    mesh = _mesh(cfg)
    if bundle is None:
        from jaxflow.convert import CheckpointError

        try:
            return load_bundle(cfg.checkpoint, template=_template(cfg), dtype=cfg.dtype, mesh=mesh, rules=cfg.sharding)
        except CheckpointError as e:
            raise EvaluationError(str(e)) from None
    if bundle.template != _template(cfg):
        bundle = dataclasses.replace(bundle, template=_template(cfg))
    if mesh is not None:
        from jaxflow.sharding import shard

        bundle = dataclasses.replace(bundle, model=shard(bundle.model, mesh, cfg.sharding))
    return bundle


def _plan_run(cfg: EvalConfig, out: str, ds, max_new: int, bundle) -> _Run:
    """The run's parameters and batch plan (the same on every process; nothing is written)."""
    L = int(bundle.config.text.num_layers)
    layers = resolve_layers(cfg.sweep, L)
    files = {"predictions": os.path.join(out, PREDICTIONS), "run": os.path.join(out, "run.json"),
             "summary_json": os.path.join(out, "summary.json"), "summary_csv": os.path.join(out, "summary.csv"),
             "figure": os.path.join(out, CURVE_PNG)}
    plan = plan_batches(prompt_lengths(bundle, ds.items), cfg.batch_size)
    return _Run(bundle, ds, run_params(cfg, ds, max_new, L), layers, layers if layers is not None else [L], max_new,
                plan, files)


def _open_run(cfg: EvalConfig, out: str, ds, max_new: int, bundle, processes: int) -> _Run:
    """Load the model and create or reopen the run folder (run.json; --overwrite deletes the old
    run's files). Only process 0 calls it."""
    run = _plan_run(cfg, out, ds, max_new, _load_model(cfg, bundle))
    if cfg.overwrite and os.path.isfile(os.path.join(out, REPORT_HTML)):  # the old run's report goes with its files
        os.remove(os.path.join(out, REPORT_HTML))
    start = {"batch_size": int(cfg.batch_size)}
    if processes > 1:
        start["processes"] = int(processes)
    if cfg.mesh:
        start.update(mesh=cfg.mesh, sharding=cfg.sharding)
    run.resumed = open_run_dir(out, run.params, overwrite=cfg.overwrite, extra=start)["resumed"]
    return run


def _check_stray(where: str, records, run: _Run) -> None:
    ids = {it.id for it in run.ds.items}
    stray = [r for r in records if r["id"] not in ids or int(r["K"]) not in run.record_layers]
    if stray:
        raise EvaluationError(f"{where} has records of other items or layers (e.g. id {stray[0]['id']!r}, "
                              f"K {stray[0]['K']}): use --overwrite to start over")


def _run_shard(cfg: EvalConfig, run: _Run, path: str, index: int, count: int, on_batch) -> _Shard:
    """Run the batches of process `index` of `count` (plan[index::count]) that miss a record,
    appending to `path`. Done: the records of `path` and, with several processes, those of
    predictions.jsonl and of the other per-host files (so nothing is generated twice)."""
    items = run.ds.items
    known = known_records(os.path.dirname(path), skip=path) if count > 1 else []
    _check_stray(os.path.dirname(path) if known else path, known, run)
    with PredictionLog(path) as plog:
        _check_stray(path, plog.records, run)
        plog.done.update((str(r["id"]), int(r["K"])) for r in known)
        mine = run.plan[index::count]
        todo = [b for b in mine if any((items[i].id, k) not in plog.done for i in b for k in run.record_layers)]
        total = sum(len(b) for b in mine)
        n_done = total - sum(len(b) for b in todo)
        if run.resumed:
            log.info("%s: resuming: %d of %d items done, %d batch(es) to go", path, n_done, total, len(todo))
        t0 = time.perf_counter()
        desc = f"{cfg.dataset} ({sweep_tag(cfg.sweep)})" + (f" process {index}/{count}" if count > 1 else "")
        skipped = _run_batches(cfg, run.bundle, items, todo, run.layers, run.record_layers, run.max_new, plog, n_done,
                               on_batch, total=total, desc=desc)
        seconds = time.perf_counter() - t0
        records = list(plog.records)
    return _Shard(records, skipped, sum(len(b) for b in todo), seconds)


# --------------------------------------------------------------------------- several processes


def process_grid() -> tuple[int, int]:
    """(this process's index, the number of processes): (0, 1) unless jax.distributed is initialised."""
    import jax

    return jax.process_index(), jax.process_count()


def host_lock(index: int, count: int) -> str:
    """The lock file process `index` (> 0) of a multi-host run holds (process 0 holds .lock)."""
    return f".lock.host{index}-of-{count}"


class HostSync:
    """Messages between the processes of one multi-host run through the key-value store of
    jax.distributed's coordinator (no cross-process collectives, so it works on CPU too): process 0
    publishes "ready" (the run folder is open) and "finished", every other process "done/{i}". Each
    key is set once per launch (the store lives with the coordinator); a value is a JSON object,
    with "error" when the sender stopped."""

    PREFIX = "jaxflow/evaluate/"
    POLL_MS = 10_000

    def __init__(self):
        from jax._src import distributed

        self._client = distributed.global_state.client
        if self._client is None:
            raise EvaluationError("several jax processes but no jax.distributed client: call "
                                  "jax.distributed.initialize() first (scripts: --distributed)")
        self._sent: set[str] = set()

    def publish(self, key: str, value: dict) -> None:
        """Set `key` (once: later calls with the same key do nothing)."""
        if key in self._sent:
            return
        self._sent.add(key)
        self._client.key_value_set(self.PREFIX + key, json.dumps(value))

    def wait(self, key: str, what: str) -> dict:
        """The value of `key`, waiting as long as it takes (a process that dies takes the others down
        with it: jax.distributed's heartbeats)."""
        t0 = time.monotonic()
        while True:
            try:
                return json.loads(self._client.blocking_key_value_get(self.PREFIX + key, self.POLL_MS))
            except Exception as e:  # jax.errors.JaxRuntimeError; a timeout is DEADLINE_EXCEEDED
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
            log.info("waiting for %s (%.0f s)", what, time.monotonic() - t0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _run_multihost(cfg, out, max_new, bundle, on_batch, index, count) -> EvalResult:
    """One process of a multi-host run. Every process computes the same batch plan and runs batches
    index, index + count, ... into its own predictions.host{index}-of-{count}.jsonl; process 0 alone
    writes the shared files: it opens the run folder (run.json, --overwrite, the generated data)
    before the others start, waits for every process to finish, merges the per-host files into
    predictions.jsonl and writes the summary. A process that stops tells the others (HostSync)."""
    sync = HostSync()
    try:
        if index == 0:
            return _lead_process(cfg, out, max_new, bundle, on_batch, sync, count)
        return _other_process(cfg, out, max_new, bundle, on_batch, sync, index, count)
    except BaseException as e:
        msg = {"error": _first_line(e)}
        try:
            for key in (("ready", "finished") if index == 0 else (f"done/{index}",)):
                sync.publish(key, msg)
        except Exception:  # the coordinator is gone: the others stop anyway
            pass
        raise


def _lead_process(cfg, out, max_new, bundle, on_batch, sync, count) -> EvalResult:
    """Process 0: open the run folder, say "ready", run its batches, wait for every "done/{i}",
    merge, write the summary, say "finished"."""
    if not cfg.overwrite:
        precheck_run_dir(out, run_params(cfg, None, max_new))
    os.makedirs(out, exist_ok=True)
    with RunLock(out):
        ds = _load_checked(cfg, out, max_new)
        run = _open_run(cfg, out, ds, max_new, bundle, processes=count)
        sync.publish("ready", {"plan": run.digest})
        shard = _run_shard(cfg, run, host_predictions(out, 0, count), 0, count, on_batch)
        skipped = list(shard.skipped)
        for j in range(1, count):
            msg = sync.wait(f"done/{j}", f"process {j} to finish its batches")
            if "error" in msg:
                raise EvaluationError(f"process {j} stopped: {msg['error']} (the batches written so far are kept: "
                                      "re-run every process to resume)")
            skipped += [tuple(x) for x in msg.get("skipped", [])]
        merge_predictions(out, run.order)
        records = read_records(run.files["predictions"])
    res = _finish(cfg, out, run, records, skipped, shard.items_run, shard.seconds)
    sync.publish("finished", {"ok": True})
    return res


def _other_process(cfg, out, max_new, bundle, on_batch, sync, index, count) -> EvalResult:
    """Process index > 0: load the model, wait for "ready", check its run against process 0's, run
    its batches, say "done/{index}", wait for "finished"; writes only its own per-host file."""
    import tempfile

    if not cfg.overwrite:
        precheck_run_dir(out, run_params(cfg, None, max_new))
    os.makedirs(out, exist_ok=True)
    with RunLock(out, host_lock(index, count)), tempfile.TemporaryDirectory(prefix="jaxflow-eval-") as tmp:
        bundle = _load_model(cfg, bundle)  # meanwhile process 0 opens the run folder
        ready = sync.wait("ready", "process 0 to open the run folder")
        if "error" in ready:
            raise EvaluationError(f"process 0 stopped: {ready['error']}")
        ds = _load_data(cfg, tmp)  # generated data: this process's own copy (process 0 writes the folder's)
        run = _plan_run(cfg, out, ds, max_new, bundle)
        _check_same_run(out, run, index)
        if run.digest != ready["plan"]:
            raise EvaluationError(f"process {index} plans other batches than process 0 (another --batch_size or "
                                  "other data?): give every process the same flags")
        shard = _run_shard(cfg, run, host_predictions(out, index, count), index, count, on_batch)
        sync.publish(f"done/{index}", {"skipped": [list(x) for x in shard.skipped], "items_run": shard.items_run})
    fin = sync.wait("finished", "process 0 to merge the predictions and write the summary")
    if "error" in fin:
        raise EvaluationError(f"process 0 stopped: {fin['error']}")
    return _result_on_disk(out, run, shard)


def _check_same_run(out: str, run: _Run, index: int) -> None:
    """Process `index`'s parameters against the run.json process 0 has just written."""
    from jaxflow.evaluation.records import RUN_JSON, _read_run_json, param_differences

    diffs = param_differences(_read_run_json(os.path.join(out, RUN_JSON))["params"], json.loads(json.dumps(run.params)))
    if diffs:
        raise EvaluationError(f"process {index} was given other settings than process 0 ({'; '.join(diffs)}): "
                              "give every process the same flags")


def _result_on_disk(out: str, run: _Run, shard: _Shard) -> EvalResult:
    """The EvalResult of a process other than 0: process 0's summary, this process's own counts."""
    files = dict(run.files)
    with open(files["summary_json"], encoding="utf-8") as f:
        summary = json.load(f)
    if "submission" in summary:
        files = {k: v for k, v in files.items() if k in ("predictions", "run", "summary_json")}
        name = summary["submission"].get(str(run.L)) or next(iter(summary["submission"].values()))
        files["submission"] = os.path.join(out, name)
    else:
        files["report"] = os.path.join(out, REPORT_HTML)
    return EvalResult(summary=summary, out=out, files=files, items_run=shard.items_run, seconds=shard.seconds,
                      skipped=shard.skipped)


def _prepare_checked(cfg, bundle, batch_items, rows, skip_bad):
    """prepare_batch, and on an unreadable image: find the bad items (skip them with skip_bad,
    else raise naming the item and file). Returns (PreparedBatch or None, [(id, reason)])."""
    try:
        return prepare_batch(bundle, batch_items, rows=rows, length_bucket=cfg.length_bucket,
                             pad_square=cfg.pad_square), []
    except (OSError, ValueError) as first:
        good, bad = [], []
        for it in batch_items:
            try:
                prepare_batch(bundle, [it], rows=1, length_bucket=cfg.length_bucket, pad_square=cfg.pad_square)
                good.append(it)
            except (OSError, ValueError) as e:
                bad.append((it.id, f"{it.image}: {e}"))
        if not bad:
            raise EvaluationError(f"cannot prepare a batch: {first}") from first
        if not skip_bad:
            raise EvaluationError(f"item {bad[0][0]}: cannot read its image {bad[0][1]} "
                                  "(--skip_bad skips such items)") from None
        for i, why in bad:
            log.warning("skipping item %s: %s", i, why)
        if not good:
            return None, bad
        return prepare_batch(bundle, good, rows=rows, length_bucket=cfg.length_bucket,
                             pad_square=cfg.pad_square), bad


def _run_batches(cfg, bundle, items, todo, layers, record_layers, max_new, plog, n_done, on_batch, *,
                 total=None, desc=None):
    from tqdm import tqdm

    skipped = []
    rows = int(cfg.batch_size)
    total = len(items) if total is None else total
    bar = tqdm(total=total, initial=n_done, unit="item", desc=desc or f"{cfg.dataset} ({sweep_tag(cfg.sweep)})",
               disable=not cfg.progress or not todo, dynamic_ncols=True, smoothing=0.1)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxflow-eval-prefetch")
    try:
        def submit(b):
            return pool.submit(_prepare_checked, cfg, bundle, [items[i] for i in b], rows, cfg.skip_bad)

        nxt = submit(todo[0]) if todo else None
        for bi, b in enumerate(todo):
            batch, bad = nxt.result()
            nxt = submit(todo[bi + 1]) if bi + 1 < len(todo) else None  # load the next images meanwhile
            skipped.extend(bad)
            written = 0
            if batch is not None:
                answers = generate_batch(bundle, batch, layers, max_new, cfg.length_bucket)
                recs = []
                for k in record_layers:
                    for it, (text, n_tok) in zip(batch.items, answers[k]):
                        recs.append({"id": it.id, "K": int(k), "prediction": text,
                                     "score": item_score(cfg.dataset, text, it, cfg.protocol),
                                     "n_tokens": int(n_tok)})
                written = plog.append(recs)
            bar.update(len(b))
            if on_batch is not None:
                on_batch({"batch": bi, "n_batches": len(todo), "items_done": bar.n, "n_items": total,
                          "records_written": written})
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
    return skipped
