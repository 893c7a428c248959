"""The independent torch reference for the analysis tests (CAM, attention shares, saliency).

One tiny transformers LLaVA (eager attention, GQA, 4x4 image grid, 3 decoder layers) is built, saved
and converted once per test process (`pair()` is cached), so the three analysis test
files share one conversion. Everything on the torch side is plain autograd: forward hooks on
`post_attention_layernorm` (retain_grad on its output) and `output_attentions` (eager returns the
softmax probabilities that the forward multiplies with the values).
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import numpy as np

import hf_reference as R

GRID = 4
NUM_IMAGE_TOKENS = GRID * GRID
ANSWER_LENGTHS = (3, 1, 2)


def hf_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, projection_dim=16, initializer_factor=1.0,
             image_size=14 * GRID, patch_size=14, num_hidden_layers=2)
    t = dict(vocab_size=R.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlavaConfig(vision_config=CLIPVisionConfig(**v).to_dict(), text_config=LlamaConfig(**t).to_dict(),
                       image_token_id=R.IMAGE_TOKEN, tie_word_embeddings=False, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


@functools.lru_cache(maxsize=1)
def pair():
    """(torch model, jaxflow model) with identical weights (save_pretrained -> convert -> load)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    import jaxflow

    tmp = tempfile.mkdtemp(prefix="jaxflow-analysis-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration._from_config(hf_config(), attn_implementation="eager").eval()
    R.save_hf(hf, f"{tmp}/hf")
    # the converter the CLI runs, in process (the CLI itself is tested in test_parity / test_convert_errors;
    # a subprocess here would cost ~10 s of imports on a 2-core runner)
    jaxflow.convert_checkpoint(f"{tmp}/hf", f"{tmp}/jf", "float32", progress=False, allow_no_tokenizer=True)
    return hf, jaxflow.load(f"{tmp}/jf")


def inputs(padding: str = "left", seed: int = 0):
    """3 rows [BOS, system.., image x16, user.., answer..] padded: ids, mask, answer_mask (B, T), pixels."""
    rng = np.random.RandomState(seed)
    rows, answers = [], []
    for (pre, post), k in zip(((3, 5), (2, 3), (4, 6)), ANSWER_LENGTHS):
        prompt = [1] + list(rng.randint(5, R.VOCAB - 2, size=pre - 1)) + [R.IMAGE_TOKEN] * NUM_IMAGE_TOKENS + \
            list(rng.randint(5, R.VOCAB - 2, size=post))
        ans = list(rng.randint(5, R.VOCAB - 2, size=k))
        rows.append(prompt + ans)
        answers.append((len(prompt), k))
    t = max(map(len, rows))
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    amask = np.zeros((3, t), bool)
    for i, (r, (plen, k)) in enumerate(zip(rows, answers)):
        start = t - len(r) if padding == "left" else 0
        ids[i, start:start + len(r)], mask[i, start:start + len(r)] = r, 1
        amask[i, start + plen:start + plen + k] = True
    pixels = rng.randn(3, 3, 14 * GRID, 14 * GRID).astype(np.float32)
    return ids, mask, amask, pixels


def image_positions(ids):
    return np.stack([np.flatnonzero(row == R.IMAGE_TOKEN) for row in ids])  # (B, N)


def _forward(hf, ids, mask, pixels, **kw):
    import torch

    return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(R.positions(mask)), **kw)


def _answer_logit_terms(logits, ids, amask):
    """Per (row, answer token): logits[b, p - 1, ids[b, p]], as a list of (b, index-in-answer, tensor)."""
    terms = []
    for b in range(ids.shape[0]):
        for j, p in enumerate(np.flatnonzero(amask[b])):
            terms.append((b, j, logits[b, p - 1, int(ids[b, p])]))
    return terms


def torch_site(hf, ids, mask, amask, pixels, per_token: bool = False, score: str = "logit"):
    """Torch autograd at every layer's post_attention_layernorm output, image tokens only.

    Returns (G, h): G (B, L, N, D) for the summed target, or (B, A, L, N, D) per answer token
    (one backward per answer index, rows summed: rows do not interact); h (B, L, N, D).
    score "logprob" differentiates log-softmax values instead of logits.
    """
    import torch

    outs = []

    def hook(_module, _inp, out):
        out.retain_grad()
        outs.append(out)

    layers = hf.model.language_model.layers
    handles = [l.post_attention_layernorm.register_forward_hook(hook) for l in layers]
    try:
        logits = _forward(hf, ids, mask, pixels).logits
    finally:
        for h in handles:
            h.remove()
    if score == "logprob":
        logits = torch.log_softmax(logits, dim=-1)
    pos = image_positions(ids)
    b_idx = np.arange(ids.shape[0])[:, None]

    def grads():
        g = np.stack([o.grad.detach().numpy() for o in outs], axis=1)  # (B, L, T, D)
        return g[b_idx, :, pos].transpose(0, 2, 1, 3)  # (B, L, N, D)

    h = np.stack([o.detach().numpy() for o in outs], axis=1)[b_idx, :, pos].transpose(0, 2, 1, 3)
    terms = _answer_logit_terms(logits, ids, amask)
    if not per_token:
        torch.stack([t for _, _, t in terms]).sum().backward()
        return grads(), h
    a = max(j for _, j, _ in terms) + 1
    g_all = np.zeros((ids.shape[0], a) + h.shape[1:], np.float32)
    for j in range(a):
        for o in outs:
            o.grad = None
        torch.stack([t for _, jj, t in terms if jj == j]).sum().backward(retain_graph=True)
        g = grads()
        for b in {b for b, jj, _ in terms if jj == j}:
            g_all[b, j] = g[b]
    return g_all, h


def torch_attentions(hf, ids, mask, pixels, grad_of_answer_mask=None):
    """Eager attention probabilities (B, L, H, T, T); with an answer mask also ds/dA of the target."""
    import torch

    out = _forward(hf, ids, mask, pixels, output_attentions=True)
    atts = list(out.attentions)
    if grad_of_answer_mask is None:
        return np.stack([a.detach().numpy() for a in atts], axis=1), None
    for a in atts:
        a.retain_grad()
    terms = _answer_logit_terms(out.logits, ids, grad_of_answer_mask)
    torch.stack([t for _, _, t in terms]).sum().backward()
    return (np.stack([a.detach().numpy() for a in atts], axis=1),
            np.stack([a.grad.numpy() for a in atts], axis=1))


# ----------------------------------------------------------------------------- the DESIGN.md formulas, numpy


def np_raw_cam(g, h, method):
    """g, h (..., N, D) -> (..., N)."""
    g, h = g.astype(np.float64), h.astype(np.float64)
    if method == "paper":
        alpha = np.maximum(g, 0).mean(axis=-2, keepdims=True)
        return np.maximum((alpha * h).mean(axis=-1), 0)
    if method == "gradcam":
        alpha = g.mean(axis=-2, keepdims=True)
        return np.maximum((alpha * h).sum(axis=-1), 0)
    if method == "gradxact":
        return np.maximum((g * h).sum(axis=-1), 0)
    raise ValueError(method)


def np_normalize(raw, threshold=None):
    mx = raw.max(axis=-1, keepdims=True)
    out = np.where(mx > 0, raw / np.where(mx > 0, mx, 1), 0.0)
    if threshold is not None:
        out = np.where(out >= threshold, out, 0.0)
    return out


def rel_err(got, want):
    """max |got - want| / max |want| (the scale of the reference, so near-zero entries do not blow up)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max()
    assert scale > 0, "reference is all zeros"
    return np.abs(got - want).max() / scale
