"""One image, one question, every cut layer K: answers, the answer's probability, the cliff layer.

Family-agnostic: the image is encoded by the bundle's family (LLaVA: one image; InternVL: its tiles and
thumbnail), and the cut removes all of the image's tokens, however many the image gives
(`SweepReport.num_image_tokens`, counted in the ids). pad_square is LLaVA-only.

`sweep_reports` does the same for a batch of (image, question) pairs in one pass per batch;
`run_sweep_report(..., items=...)` runs a folder or JSON-lines file of them (`viz.report.read_items`)
and writes one sub-folder per item plus one report.html."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxflow.analysis.truncation import truncation_generate, truncation_sweep
from jaxflow.evaluation.cliff import cliff_layer
from jaxflow.pipeline import Bundle, decode_answers, encode


@dataclasses.dataclass
class SweepReport:
    layers: np.ndarray  # (V,) cut layers K
    answers: list[str]  # greedy answer under each K
    answer_ids: list[list[int]]  # its token ids (EOS dropped)
    reference_answer: str  # the untruncated model's answer (K = L), the one whose probability is tracked
    answer_logprob: np.ndarray  # (V,) log p(reference answer | prompt) under each K, teacher-forced
    first_token_logprob: np.ndarray  # (V,) log p(first answer token | prompt) under each K
    first_token_margin: np.ndarray  # (V,) logit of the answer's first token minus the best other logit
    cliff: int  # jaxflow.evaluation.cliff.cliff_layer of the first answer token's probability
    num_image_tokens: int = 0  # the image's tokens in the prompt (what the cut removes), counted in the ids

    def to_json(self) -> dict:
        return {"layers": self.layers.tolist(), "answers": self.answers, "answer_ids": self.answer_ids,
                "reference_answer": self.reference_answer, "num_image_tokens": self.num_image_tokens,
                "answer_probability": np.exp(self.answer_logprob).tolist(),
                "answer_logprob": self.answer_logprob.tolist(),
                "first_token_probability": np.exp(self.first_token_logprob).tolist(),
                "first_token_margin": self.first_token_margin.tolist(), "cliff_layer": self.cliff}


def sweep_report(bundle: Bundle, image, question: str, *, max_new_tokens: int = 16, layers=None,
                 keep_top_k: int = 0, epsilon: float = 0.05, pad_square: bool = False) -> SweepReport:
    """Greedy answers for every K, and how likely each variant finds the untruncated answer."""
    return sweep_reports(bundle, [image], [question], max_new_tokens=max_new_tokens, layers=layers,
                         keep_top_k=keep_top_k, epsilon=epsilon, pad_square=pad_square)[0]


def sweep_reports(bundle: Bundle, images, questions, *, max_new_tokens: int = 16, layers=None,
                  keep_top_k: int = 0, epsilon: float = 0.05, pad_square: bool = False,
                  progress=None) -> list[SweepReport]:
    """`sweep_report` of several (image, question) pairs as one batch (rows padded on the left):
    one `truncation_generate` and one teacher-forced `truncation_sweep` for all of them. Returns one
    SweepReport per pair, in order."""
    from jaxflow.pipeline import SCRIPT_LENGTH_BUCKET, check_pad_square, image_token_count

    images, questions = list(images), list(questions)
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    check_pad_square(bundle, pad_square)
    model = bundle.model
    L = model.config.text.num_layers
    ks = np.arange(L + 1) if layers is None else np.asarray(sorted(set(int(k) for k in layers) | {L}))
    # left-padded to the scripts' length bucket: questions of similar length share compiled programs
    batch, enc = encode(bundle, images, questions, pad_square=pad_square, with_images=True,
                        length_bucket=SCRIPT_LENGTH_BUCKET)
    say = progress or (lambda *_: None)
    say(f"truncated generation: {len(ks)} cut layers K at once, up to {max_new_tokens} tokens "
        "(compiles on first use, from the cache afterwards)")
    gen = truncation_generate(model, batch.input_ids, enc.pixel_values, batch.attention_mask, ks,
                              max_new_tokens=max_new_tokens, keep_top_k=keep_top_k, **enc.image_kw)
    eos = tuple(model.config.text.eos_token_id)
    n = len(images)
    answers = [decode_answers(bundle.tokenizer, gen.tokens[v], gen.lengths[v], eos) for v in range(len(ks))]  # [V][B]
    ids = [[[int(t) for t in gen.tokens[v, b, :gen.lengths[v, b]] if int(t) not in eos] for v in range(len(ks))]
           for b in range(n)]  # [B][V]
    ref_ids = [ids[b][-1] or [int(gen.tokens[-1, b, 0])] for b in range(n)]  # an empty answer: track its first token
    # teacher-force the reference answers: prompt + answer, every K at once
    say("teacher-forced sweep: the untruncated answer's probability under every K")
    tf, tf_enc = encode(bundle, images, questions, ref_ids, pad_square=pad_square, with_images=True,
                        length_bucket=SCRIPT_LENGTH_BUCKET)
    sweep = truncation_sweep(model, tf.input_ids, tf_enc.pixel_values, tf.attention_mask, ks, keep_top_k=keep_top_k,
                             **tf_enc.image_kw)
    out = []
    for b in range(n):
        ref = ref_ids[b]
        n_prompt_after_image = int(sweep.mask[b].sum()) - len(ref)
        # slot j predicts the token at slot j + 1; the answer starts at slot n_prompt_after_image
        logits = sweep.logits[:, b]  # (V, Ta, vocab)
        pred = logits[:, n_prompt_after_image - 1:n_prompt_after_image - 1 + len(ref)]  # (V, n_ans, vocab)
        logp = pred - _logsumexp(pred)
        answer_logprob = np.take_along_axis(logp, np.asarray(ref)[None, :, None], -1)[..., 0].sum(-1)
        first = pred[:, 0]
        y0 = ref[0]
        others = np.delete(first, y0, axis=-1).max(-1)
        margin = first[:, y0] - others
        first_logprob = logp[:, 0, y0]
        # the cliff follows the first answer token: for the short answers of VQA it is the answer, and a
        # long answer's joint probability is small even when nothing changes
        cliff = cliff_layer(ks, np.exp(first_logprob), epsilon)
        out.append(SweepReport(layers=ks, answers=[answers[v][b] for v in range(len(ks))], answer_ids=ids[b],
                               reference_answer=answers[-1][b], answer_logprob=answer_logprob,
                               first_token_logprob=first_logprob, first_token_margin=margin, cliff=cliff,
                               num_image_tokens=image_token_count(tf.input_ids[b], tf.attention_mask[b],
                                                                  model.config.image_token_id)))
    return out


def _logsumexp(x):
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def run_sweep_report(checkpoint, image, question, *, out, mesh=None, rules="tp", template=None, max_new_tokens=16, layers=None,
                     keep_top_k=0, epsilon=0.05, pad_square=False, overwrite=False, items=None, batch_size=8,
                     progress=None, bundle=None):
    """What scripts/truncation_sweep.py does: report + answers.json + sweep.png + report.html in `out`,
    published by `jaxflow.outputs` (a folder holding files jaxflow did not write is refused unless
    `overwrite`). Returns (SweepReport, [paths]).

    Several images: `items` (with image=None) is a folder or JSON-lines path (`viz.report.read_items`;
    a folder's images all get `question`) or a sequence of `Item`s / (image, question) tuples; they
    run in batches of `batch_size`, each item's answers.json and sweep.png go to
    `out/<index>_<image stem>/`, with one report.html (a summary table, then one section per item) and
    items.json at the top. Everything is checked before any computation. Returns ([SweepReport per
    item], [paths of the top-level entries]). Raises ValueError (one line) on bad input. `bundle`: the
    checkpoint's already loaded bundle, to skip loading it again."""
    import os
    import shutil

    from jaxflow.outputs import check_out_dir, publish, staging_dir
    from jaxflow.pipeline import bundle_for, write_json
    from jaxflow.viz import html_report as H
    from jaxflow.viz.report import Item, as_items
    from jaxflow.viz.truncation import plot_sweep_report

    t_start = time.time()

    def say(msg):
        if progress:
            progress(f"[{time.time() - t_start:6.1f}s] {msg}")

    multi = items is not None
    if multi and image is not None:
        raise ValueError("--image and --images are mutually exclusive: pass one")
    if not multi:
        if not question or not question.strip():
            raise ValueError("--question is empty")
        if not os.path.isfile(image):
            raise ValueError(f"image not found: {image}")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    item_list = as_items(items, question) if multi else [Item(image, question, name="", source="--image")]
    final = check_out_dir(out, overwrite=overwrite)
    try:
        layers = None if layers is None else [int(k) for k in layers]
    except ValueError as e:
        raise ValueError(f"--layers must be integers: {e}") from e
    bundle = bundle_for(checkpoint, bundle, template=template, progress=say, mesh=mesh, rules=rules)
    L = bundle.config.text.num_layers
    if layers is not None and any(k < 0 or k > L for k in layers):  # before any computation
        raise ValueError(f"layers must be cut layers K in 0..{L} ({L} = untruncated), got {sorted(set(layers))}")
    reports = []
    for start in range(0, len(item_list), batch_size):
        chunk = item_list[start:start + batch_size]
        if multi:
            say(f"items {start}..{start + len(chunk) - 1} of {len(item_list)}")
        reports += sweep_reports(bundle, [it.image for it in chunk], [it.question for it in chunk],
                                 max_new_tokens=max_new_tokens, layers=layers, keep_top_k=keep_top_k,
                                 epsilon=epsilon, pad_square=pad_square, progress=say)
    say("writing answers.json, sweep.png and report.html")
    settings = {"max_new_tokens": max_new_tokens, "layers": "all (0..L)" if layers is None else layers,
                "keep_top_k": keep_top_k, "epsilon": epsilon, "template": bundle.template, "pad_square": pad_square}
    if multi:
        settings = {"images": os.fspath(items) if isinstance(items, (str, os.PathLike)) else f"{len(item_list)} items",
                    "question": question, "items": len(item_list), "batch_size": batch_size, **settings}
    settings.update(out=os.path.abspath(out), overwrite=overwrite)
    tmp = staging_dir(final)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes `out`
        sections = []
        for it, report in zip(item_list, reports):
            folder = os.path.join(tmp, it.name) if multi else tmp
            os.makedirs(folder, exist_ok=True)
            data = {"model": bundle.name, "family": bundle.family, "image": os.path.abspath(it.image),
                    "question": it.question, "keep_top_k": keep_top_k, "epsilon": epsilon, **report.to_json()}
            write_json(os.path.join(folder, "answers.json"), data)
            title = f"{bundle.name}: {it.question!r} (cliff layer {report.cliff})"
            plot_sweep_report(report, os.path.join(folder, "sweep.png"), title=title if len(title) < 110 else
                              title[:107] + "...")
            sections.append(_item_section(bundle, it, report, folder, multi=multi, pad_square=pad_square))
        parts = [H.section("Model", H.kv_table(H.model_facts(bundle, checkpoint), ("model", ""))),
                 H.section("Settings", H.kv_table(settings))]
        if multi:
            parts.append(H.section("Summary", _summary_table(item_list, reports)))
        parts += sections
        parts.append(H.section("How to read it", H.para(
            "K is the cut layer: from layer K on no query attends to an image token (K = L is the untruncated "
            "model). P(first token) and P(answer) are the probabilities, under each K, of the untruncated "
            "answer's first token and of the whole answer (teacher-forced); the margin is the first token's "
            "logit minus the best other logit. The cliff layer is the smallest K from which P(first token) "
            f"stays within epsilon = {epsilon:g} of its value at K = L (highlighted row).")))
        sub = (f"{len(item_list)} items" if multi else os.path.basename(image))
        H.write_html(os.path.join(tmp, "report.html"),
                     H.page(f"jaxflow truncation sweep: {bundle.name}", *parts, subtitle=sub))
        if multi:
            write_json(os.path.join(tmp, "items.json"), {"model": bundle.name, "items": [
                {"index": i, "folder": it.name, "image": os.path.abspath(it.image), "question": it.question,
                 "reference_answer": r.reference_answer, "cliff_layer": r.cliff, "source": it.source}
                for i, (it, r) in enumerate(zip(item_list, reports))]})
        entries = publish(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if multi:
        return reports, [os.path.join(out, e) for e in entries]
    return reports[0], [os.path.join(out, "answers.json"), os.path.join(out, "sweep.png"),
                        os.path.join(out, "report.html")]


def _item_section(bundle, it, report, folder, *, multi, pad_square):
    """One item's part of report.html: facts, the prompt as tokenised, the per-K table, the figure."""
    import os

    from jaxflow.viz import html_report as H

    batch, _ = encode(bundle, [it.image], [it.question], pad_square=pad_square)
    ks = [int(k) for k in report.layers]
    L = ks[-1]
    rows, hl = [], []
    for v, k in enumerate(ks):
        rows.append((k, report.answers[v], float(np.exp(report.first_token_logprob[v])),
                     float(np.exp(report.answer_logprob[v])), float(report.first_token_margin[v]),
                     "cliff" if k == report.cliff else ("untruncated" if k == L else "")))
        if k == report.cliff:
            hl.append(v)
    facts = {"image": os.path.abspath(it.image), "question": it.question,
             "untruncated answer (K = L)": report.reference_answer, "cliff layer": report.cliff,
             "image tokens (what the cut removes)": report.num_image_tokens}
    if multi:
        facts["files"] = f"{it.name}/ (answers.json, sweep.png)"
    prompt = H.prompt_html(bundle.tokenizer, batch.input_ids[0], image_token_id=bundle.config.image_token_id,
                           attention_mask=batch.attention_mask[0], texts=[it.question])
    return H.section(f"{it.name}: {os.path.basename(it.image)}" if multi else "Result",
                     H.kv_table(facts, ("item", "")),
                     H.section("Prompt as tokenised", prompt, level=3),
                     H.section("Per cut layer K", H.table(("K", "answer under K", "P(first token)", "P(answer)",
                                                           "margin", ""), rows, left=(1, 5), highlight=hl), level=3),
                     H.figure(os.path.join(folder, "sweep.png"), "sweep.png: the answer's probability and the "
                              "first token's margin against K, cliff layer marked"),
                     anchor=f"item-{it.name}" if multi else "result")


def _summary_table(items, reports):
    from jaxflow.viz import html_report as H

    rows = []
    for it, r in zip(items, reports):
        rows.append((H.link(it.name, f"item-{it.name}"), it.question, r.reference_answer, r.answers[0],
                     float(np.exp(r.first_token_logprob[-1])), float(np.exp(r.first_token_logprob[0])), r.cliff))
    return H.table(("item", "question", "answer (K = L)", f"answer (K = {int(reports[0].layers[0])})",
                    "P(first token), K = L", f"P(first token), K = {int(reports[0].layers[0])}", "cliff layer"),
                   rows, left=(0, 1, 2, 3))
