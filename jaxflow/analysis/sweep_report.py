"""One image, one question, every cut layer K: answers, the answer's probability, the cliff layer.

Family-agnostic: the image is encoded by the bundle's family (LLaVA: one image; InternVL: its tiles and
thumbnail), and the cut removes all of the image's tokens, however many the image gives
(`SweepReport.num_image_tokens`, counted in the ids). pad_square is LLaVA-only."""
from __future__ import annotations

import dataclasses

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
    from jaxflow.pipeline import check_pad_square, image_token_count

    check_pad_square(bundle, pad_square)
    model = bundle.model
    L = model.config.text.num_layers
    ks = np.arange(L + 1) if layers is None else np.asarray(sorted(set(int(k) for k in layers) | {L}))
    batch, enc = encode(bundle, [image], [question], pad_square=pad_square, with_images=True)
    gen = truncation_generate(model, batch.input_ids, enc.pixel_values, batch.attention_mask, ks,
                              max_new_tokens=max_new_tokens, keep_top_k=keep_top_k, **enc.image_kw)
    eos = tuple(model.config.text.eos_token_id)
    answers = [decode_answers(bundle.tokenizer, gen.tokens[v], gen.lengths[v], eos)[0] for v in range(len(ks))]
    ids = [[int(t) for t in gen.tokens[v, 0, :gen.lengths[v, 0]] if int(t) not in eos] for v in range(len(ks))]
    ref_ids = ids[-1] or [int(gen.tokens[-1, 0, 0])]  # an empty answer: track its first token (EOS)
    # teacher-force the reference answer: prompt + answer, every K at once
    tf, tf_enc = encode(bundle, [image], [question], [ref_ids], pad_square=pad_square, with_images=True)
    sweep = truncation_sweep(model, tf.input_ids, tf_enc.pixel_values, tf.attention_mask, ks, keep_top_k=keep_top_k,
                             **tf_enc.image_kw)
    n_prompt_after_image = int(sweep.mask[0].sum()) - len(ref_ids)
    # slot j predicts the token at slot j + 1; the answer starts at slot n_prompt_after_image
    logits = sweep.logits[:, 0]  # (V, Ta, vocab)
    pred = logits[:, n_prompt_after_image - 1:n_prompt_after_image - 1 + len(ref_ids)]  # (V, n_ans, vocab)
    logp = pred - _logsumexp(pred)
    answer_logprob = np.take_along_axis(logp, np.asarray(ref_ids)[None, :, None], -1)[..., 0].sum(-1)
    first = pred[:, 0]
    y0 = ref_ids[0]
    others = np.delete(first, y0, axis=-1).max(-1)
    margin = first[:, y0] - others
    first_logprob = logp[:, 0, y0]
    # the cliff follows the first answer token: for the short answers of VQA it is the answer, and a
    # long answer's joint probability is small even when nothing changes
    cliff = cliff_layer(ks, np.exp(first_logprob), epsilon)
    return SweepReport(layers=ks, answers=answers, answer_ids=ids, reference_answer=answers[-1],
                       answer_logprob=answer_logprob, first_token_logprob=first_logprob, first_token_margin=margin,
                       cliff=cliff, num_image_tokens=image_token_count(tf.input_ids[0], tf.attention_mask[0],
                                                                       model.config.image_token_id))


def _logsumexp(x):
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def run_sweep_report(checkpoint, image, question, *, out, template=None, max_new_tokens=16, layers=None,
                     keep_top_k=0, epsilon=0.05, pad_square=False, overwrite=False) -> tuple[SweepReport, list[str]]:
    """What scripts/truncation_sweep.py does: report + answers.json + sweep.png in `out`, published by
    `jaxflow.outputs` (a folder holding files jaxflow did not write is refused unless `overwrite`)."""
    from jaxflow.outputs import check_out_dir, publish, staging_dir
    import os
    import shutil

    from jaxflow.convert import CheckpointError
    from jaxflow.pipeline import load_bundle, write_json
    from jaxflow.viz.truncation import plot_sweep_report

    if not question or not question.strip():
        raise ValueError("--question is empty")
    if not os.path.isfile(image):
        raise ValueError(f"image not found: {image}")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    final = check_out_dir(out, overwrite=overwrite)
    try:
        layers = None if layers is None else [int(k) for k in layers]
    except ValueError as e:
        raise ValueError(f"--layers must be integers: {e}") from e
    try:
        bundle = load_bundle(checkpoint, template=template)
    except (CheckpointError, OSError) as e:
        raise ValueError(str(e)) from e
    report = sweep_report(bundle, image, question, max_new_tokens=max_new_tokens, layers=layers,
                          keep_top_k=keep_top_k, epsilon=epsilon, pad_square=pad_square)
    tmp = staging_dir(final)
    try:
        data = {"model": bundle.name, "family": bundle.family, "image": os.path.abspath(image),
                "question": question, "keep_top_k": keep_top_k, "epsilon": epsilon, **report.to_json()}
        write_json(os.path.join(tmp, "answers.json"), data)
        plot_sweep_report(report, os.path.join(tmp, "sweep.png"),
                          title=f"{bundle.name}: {question!r} (cliff layer {report.cliff})")
        publish(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report, [os.path.join(out, "answers.json"), os.path.join(out, "sweep.png")]
