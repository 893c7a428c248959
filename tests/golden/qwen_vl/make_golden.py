#!/usr/bin/env python
"""Write the Qwen-VL (v1) golden files that the JAX port is tested against on a fresh clone.

Everything comes from the official Qwen-VL remote code, run offline on CPU with torch through the
reference package in ../shared/refs/qwen_vl_v1 (reference.py: tiny random-weight checkpoints in the
official layout). Nothing is downloaded. Output (default: this script's folder):

  model/       the tiny default model of reference.make_model (seed 0): config.json (as make_model
               wrote it), model.safetensors, LICENSE, NOTICE, THIRD_PARTY_NOTICES
  golden.npz   float32 / int32 arrays (see README.md in this folder for every name and shape)

    python tests/golden/qwen_vl/make_golden.py [--refs DIR] [--out DIR]

The run is deterministic: the same refs, torch and transformers give the same arrays bit for bit
(checked with 1 and 2 torch threads), and golden.npz is written with fixed zip timestamps, so its
bytes are reproducible too. A digest (sha256 of every array's bytes) is printed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_REFS = os.path.join(REPO, "..", "shared", "refs", "qwen_vl_v1")

MODEL_FILES = ["config.json", "model.safetensors", "LICENSE", "NOTICE", "THIRD_PARTY_NOTICES"]
CODE_FILES = ["configuration_qwen.py", "modeling_qwen.py", "visual.py", "qwen_generation_utils.py"]
N_NEW = 10                # greedy tokens per generation
LONG_IMAGE_STRIDE = 16    # long_pos keeps every 16th image-token position (slots 0, 16, ..., 240 of each image)
CAM_ANSWERS = (2, 1)      # answer tokens = the last 2 real tokens of row 0, the last 1 of row 1
SEEDS = {"text": 0, "short_pixels": 1, "long_pixels": 2, "genb_pixels": 3, "feat448_pixels": 4,
         "feat224_pixels": 5}


def default_refs() -> str:
    return os.path.abspath(os.environ.get("JAXFLOW_QWEN_VL_REFS") or DEFAULT_REFS)


def import_reference(refs: str):
    refs = os.path.abspath(refs)
    if not os.path.isfile(os.path.join(refs, "reference.py")):
        raise SystemExit(f"no reference.py in {refs} (pass --refs or set JAXFLOW_QWEN_VL_REFS)")
    dont = sys.dont_write_bytecode
    sys.dont_write_bytecode = True        # keep the shared refs folder free of __pycache__
    sys.path.insert(0, refs)
    try:
        import reference as qref
    finally:
        sys.path.remove(refs)
        sys.dont_write_bytecode = dont
    if os.path.dirname(os.path.abspath(qref.__file__)) != refs:
        raise SystemExit(f"imported {qref.__file__}, expected the one in {refs}")
    return qref


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def save_npz(path: str, arrays: dict) -> None:
    """np.savez_compressed with fixed zip timestamps (reproducible bytes); np.load reads it."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            a = np.asarray(arrays[name])
            np.lib.format.write_array(buf, a if a.flags.c_contiguous else a.copy(), allow_pickle=False)
            zi = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zf.writestr(zi, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(tmp, path)


def pad_positions(lists, fill=-1):
    """Ragged per-row position lists -> (B, P) int32, -1 after the end of a shorter row."""
    P = max(len(x) for x in lists)
    out = np.full((len(lists), P), fill, np.int32)
    for b, x in enumerate(lists):
        out[b, :len(x)] = x
    return out


def gather(logits, pos):
    """logits (B, T, V), pos (B, P) with -1 padding -> (B, P, V), zeros at -1."""
    out = np.zeros(pos.shape + logits.shape[2:], np.float32)
    for b in range(pos.shape[0]):
        ok = pos[b] >= 0
        out[b, ok] = logits[b, pos[b, ok]]
    return out


def variant_dir(src: str, dst: str, **visual) -> str:
    """A copy of model dir src (code + weights) whose config.json has the given visual.* overrides."""
    os.makedirs(dst)
    for f in CODE_FILES + ["model.safetensors"]:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    with open(os.path.join(src, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["visual"].update(visual)
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return dst


# ----------------------------------------------------------------------------------------------
# the golden arrays
# ----------------------------------------------------------------------------------------------
def build(qref, work: str, log=print):
    import torch

    mdir = qref.make_model(os.path.join(work, "model"))          # the tiny default, seed 0
    m = qref.load_model(mdir)                                     # from disk, checked bit for bit
    with open(os.path.join(mdir, "config.json")) as fh:
        cfg = json.load(fh)
    S = cfg["seq_length"]
    L = cfg["num_hidden_layers"]
    V = cfg["vocab_size"]
    sp = qref.special_ids(cfg)
    IMG0, IMG1, IMGPAD, PAD = sp["img_start"], sp["img_end"], sp["img_pad"], sp["eod"]
    assert (IMG0, IMG1, IMGPAD, PAD, V, S, L) == (509, 510, 511, 508, 512, 320, 2), (IMG0, IMG1, IMGPAD, PAD, V, S, L)
    span = qref.image_span(cfg)
    rs = np.random.RandomState(SEEDS["text"])

    def txt(n):                                                   # plain text ids: 0 .. 507 (no pad/image ids)
        return rs.randint(0, PAD, size=n).tolist()

    def pixels(key, n, size, block=1):
        r = np.random.RandomState(SEEDS[key])
        p = r.standard_normal((n, 3, size // block, size // block)).astype(np.float32)
        return np.ascontiguousarray(p.repeat(block, 2).repeat(block, 3))

    def batch(rows):
        ids, mask = qref.left_pad(rows, PAD)
        return ids.astype(np.int32), mask.astype(np.int32)

    A = {}

    # ---- short: one image per row, T <= seq_length (NTK alpha 1, no logn) ----
    ids, mask = batch([txt(6) + span + txt(6), txt(3) + span + txt(4)])
    pix = pixels("short_pixels", 2, 56)
    T = ids.shape[1]
    assert T <= S and qref.ntk_alpha(T, S) == 1
    lg = qref.logits(m, ids, pix, mask)
    A.update(short_ids=ids, short_mask=mask, short_pixels=pix, short_logits=lg)
    log(f"short: T {T}, real {mask.sum(1).tolist()}, <img> at {[int(np.flatnonzero(r == IMG0)[0]) for r in ids]}")

    # ---- long: two images per row, T > seq_length (alpha 3, logn on), rows of different length ----
    lids, lmask = batch([txt(4) + span + txt(3) + span + txt(6), txt(2) + span + txt(2) + span + txt(3)])
    lpix = pixels("long_pixels", 4, 56)
    TL = lids.shape[1]
    assert TL > S and qref.ntk_alpha(TL, S) == 3 and lmask[1].sum() < lmask[0].sum()
    llg = qref.logits(m, lids, lpix, lmask)
    lpos = []
    for b in range(2):
        keep = []
        for p in np.flatnonzero(lmask[b]):
            if lids[b, p] != IMGPAD:
                keep.append(p)
            else:
                a = max(q for q in np.flatnonzero(lids[b] == IMG0) if q < p)
                if (p - a - 1) % LONG_IMAGE_STRIDE == 0:
                    keep.append(p)
        lpos.append(keep)
    lpos = pad_positions(lpos)
    A.update(long_ids=lids, long_mask=lmask, long_pixels=lpix, long_pos=lpos, long_logits=gather(llg, lpos))
    log(f"long: T {TL}, real {lmask.sum(1).tolist()}, alpha {qref.ntk_alpha(TL, S)}, "
        f"long_pos {lpos.shape} ({(lpos >= 0).sum(1).tolist()} used)")

    # ---- gen: greedy, KV cache, on the short batch ----
    tok, slg = qref.generate(m, ids, pix, mask, max_new_tokens=N_NEW, return_logits=True)
    A.update(gen_tokens=tok.astype(np.int32), gen_step_logits=slg)
    d0 = float(np.abs(slg[:, 0] - lg[:, -1]).max())
    log(f"gen: tokens {tok.tolist()}; step 0 vs short_logits[:, -1] max|diff| {d0:.1e}")

    # ---- genb: prompt of 318 tokens, generation crosses seq_length (cached alpha 1, logn turns on) ----
    bids, bmask = batch([txt(20) + span + txt(40), txt(12) + span + txt(30)])
    bpix = pixels("genb_pixels", 2, 56)
    TB = bids.shape[1]
    assert S - 4 <= TB < S, TB
    btok, bslg = qref.generate(m, bids, bpix, bmask, max_new_tokens=N_NEW, return_logits=True)
    A.update(genb_ids=bids, genb_mask=bmask, genb_pixels=bpix, genb_tokens=btok.astype(np.int32),
             genb_step_logits=bslg)
    info = []
    if not np.isin(btok, [IMG0, IMG1, IMGPAD]).any():
        # a no-cache forward over prompt + generated: alpha from the full length (3 once it passes S)
        for k in (S - TB + 1, N_NEW):      # steps 0..k-1 need the first k-1 generated tokens
            full = np.concatenate([bids, btok[:, :k - 1].astype(np.int32)], 1)
            fm = np.concatenate([bmask, np.ones((2, k - 1), np.int32)], 1)
            ref = qref.logits(m, full, bpix, fm)[:, TB - 1:]
            info.append(f"no-cache over T={full.shape[1]} (alpha {qref.ntk_alpha(full.shape[1], S)}) vs cached "
                        f"steps 0..{k - 1}: max|diff| {float(np.abs(ref - bslg[:, :k]).max()):.1e}")
    log(f"genb: T {TB}, real {bmask.sum(1).tolist()}, tokens {btok.tolist()}; query positions {TB - 1}..{TB + N_NEW - 2}, "
        f"logn from step {S - TB + 1}; " + "; ".join(info))

    # ---- feat: image features (ViT + resampler), 56 px; 448 px and 224 px with the same weights ----
    A["feat"] = qref.image_features(m, pix)
    meta_feat = {}
    for size in (448, 224):
        vdir = variant_dir(mdir, os.path.join(work, f"model{size}"), image_size=size)
        mv = qref.load_model(vdir)
        p = pixels(f"feat{size}_pixels", 1, size, block=7)
        f = qref.image_features(mv, p)
        same = float(np.abs(qref.image_features(m, p) - f).max())   # config image_size is not read by forward
        A[f"feat{size}_pixels"], A[f"feat{size}"] = p, f
        meta_feat[f"feat{size}"] = {"visual.image_size": size}
        log(f"feat{size}: {f.shape}; the 56-px-config model on the same pixels: max|diff| {same:.1e}")
        del mv

    # ---- trunc: no query sees an image-token key (the 256 <imgpad>) in layers >= K ----
    img_cols = torch.as_tensor(ids == IMGPAD)[:, None, None, :]          # (B, 1, 1, T)
    add = torch.where(img_cols, torch.tensor(torch.finfo(torch.float32).min), torch.tensor(0.0))

    def hook(_mod, args, kwargs):
        am = kwargs.get("attention_mask")
        assert am is not None and am.shape == (2, 1, T, T), None if am is None else am.shape
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = am + add
        return args, kwargs

    trunc = []
    for K in range(L + 1):
        hs = [blk.register_forward_pre_hook(hook, with_kwargs=True)
              for l, blk in enumerate(m.transformer.h) if l >= K]
        try:
            trunc.append(qref.logits(m, ids, pix, mask))
        finally:
            for h in hs:
                h.remove()
    assert np.array_equal(trunc[L], lg), "K = L must reproduce the plain logits bit for bit"
    end = [int(np.flatnonzero(r == IMG1)[-1]) for r in ids]
    tpos = pad_positions([list(range(e, T)) for e in end])                 # </img> and every token after it
    A.update(trunc_pos=tpos, trunc_logits=np.stack([gather(t, tpos) for t in trunc]))
    before = 0.0          # real positions before <img> never see an image key: unchanged for every K
    for t in trunc:
        for b in range(2):
            pre = np.flatnonzero(mask[b][:int(np.flatnonzero(ids[b] == IMG0)[0])])
            before = max(before, float(np.abs(t[b, pre] - lg[b, pre]).max()))
    diffs = [float(np.abs(A["trunc_logits"][K] - A["trunc_logits"][L]).max()) for K in range(L + 1)]
    assert diffs[0] > 0.1, diffs
    log(f"trunc: trunc_pos {tpos.tolist()}; max|logits_K - logits_L| for K = 0..{L}: "
        + ", ".join(f"{d:.3f}" for d in diffs) + f"; before <img>: {before:.1e}")

    # ---- ko: attention knockout in layer 0 only: the queries from </img> on see neither the first
    # half of the <imgpad> keys nor the first real text token (a text key too); positions unchanged ----
    ko_q = np.zeros((2, T), np.int32)
    ko_k = np.zeros((2, T), np.int32)
    for b in range(2):
        ko_q[b, end[b]:] = 1
        ko_k[b, np.flatnonzero(ids[b] == IMGPAD)[:128]] = 1
        ko_k[b, np.flatnonzero(mask[b])[0]] = 1
    ko_layers = np.array([1] + [0] * (L - 1), np.int32)
    ko_add = torch.where(torch.as_tensor((ko_q[:, :, None] & ko_k[:, None, :]) > 0)[:, None],
                         torch.tensor(torch.finfo(torch.float32).min), torch.tensor(0.0))   # (B, 1, T, T)

    def ko_hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = kwargs["attention_mask"] + ko_add
        return args, kwargs

    hs = [blk.register_forward_pre_hook(ko_hook, with_kwargs=True)
          for l, blk in enumerate(m.transformer.h) if ko_layers[l]]
    try:
        ko = qref.logits(m, ids, pix, mask)
    finally:
        for h in hs:
            h.remove()
    A.update(ko_queries=ko_q, ko_keys=ko_k, ko_layers=ko_layers, ko_logits=gather(ko, tpos))
    dko = float(np.abs(A["ko_logits"] - A["trunc_logits"][L]).max())
    assert dko > 0.05, dko
    log(f"ko: layers {ko_layers.tolist()}, keys per row {ko_k.sum(1).tolist()}, max|ko - plain| at trunc_pos {dko:.3f}")

    # ---- cam: autograd at every decoder layer's ln_2 output (the MLP input) ----
    amask = np.zeros_like(mask)
    for b, k in enumerate(CAM_ANSWERS):
        amask[b, np.flatnonzero(mask[b])[-k:]] = 1
    outs = []

    def keep(_mod, _inp, out):
        out.retain_grad()
        outs.append(out)

    hs = [blk.ln_2.register_forward_hook(keep) for blk in m.transformer.h]
    try:
        ids_t, pix_t, am_t = qref._to_inputs(m, ids, pix, mask)
        with torch.enable_grad(), qref._feed_pixels(m, pix_t):
            out = m(input_ids=ids_t, attention_mask=am_t, use_cache=False, return_dict=True)
    finally:
        for h in hs:
            h.remove()
    glg = out.logits
    dcam = float((glg.detach() - torch.as_tensor(lg)).abs().max())
    terms = [glg[b, p - 1, int(ids[b, p])] for b in range(2) for p in np.flatnonzero(amask[b])]
    torch.stack(terms).sum().backward()
    m.zero_grad(set_to_none=True)
    img_pos = np.stack([np.flatnonzero(r == IMGPAD) for r in ids])         # (B, 256)
    bidx = np.arange(2)[:, None]
    g = np.stack([o.grad.numpy() for o in outs], 1)[bidx, :, img_pos].transpose(0, 2, 1, 3)    # (B, L, 256, D)
    h = np.stack([o.detach().numpy() for o in outs], 1)[bidx, :, img_pos].transpose(0, 2, 1, 3)
    g64, h64 = g.astype(np.float64), h.astype(np.float64)
    cams = {   # tests/analysis_reference.py::np_raw_cam, in float64
        "paper": np.maximum((np.maximum(g64, 0).mean(axis=-2, keepdims=True) * h64).mean(axis=-1), 0),
        "gradcam": np.maximum((g64.mean(axis=-2, keepdims=True) * h64).sum(axis=-1), 0),
        "gradxact": np.maximum((g64 * h64).sum(axis=-1), 0),
    }
    A["cam_answer_mask"] = amask
    for k, v in cams.items():
        A[f"cam_{k}"] = v.astype(np.float32)
    A["cam_grad_sum"] = g64.sum(axis=-2).astype(np.float32)
    log(f"cam: answers at {[np.flatnonzero(a).tolist() for a in amask]}, grad forward vs short_logits {dcam:.1e}, "
        f"|grad| max {np.abs(g).max():.3g}, nonzero map entries "
        + ", ".join(f"{k} {int((v > 0).sum())}" for k, v in cams.items()))

    # ---- attn_last: official output_attentions, last query of each row ----
    with torch.no_grad(), qref._feed_pixels(m, pix_t):
        out = m(input_ids=ids_t, attention_mask=am_t, use_cache=False, output_attentions=True, return_dict=True)
    assert len(out.attentions) == L
    att = torch.stack(out.attentions).numpy()                              # (L, B, H, T, T)
    A["attn_last"] = np.ascontiguousarray(att[:, :, :, -1, :])
    datt = float(np.abs(out.logits.numpy() - lg).max())
    log(f"attn_last: {A['attn_last'].shape}, logits with output_attentions vs short_logits {datt:.1e}")

    meta = {
        "source": "tests/golden/qwen_vl/make_golden.py over ../shared/refs/qwen_vl_v1/reference.py "
                  "(official Qwen-VL remote code, " + qref.SOURCE + ")",
        "model": "reference.make_model defaults (seed 0): vocab 512, seq_length 320, hidden 128, 2 layers, "
                 "4 heads, image 56 px, use_dynamic_ntk and use_logn_attn on",
        "ids": {"img_start": IMG0, "img_end": IMG1, "img_pad": IMGPAD, "pad": PAD, "text": [0, PAD - 1]},
        "overrides": {"feat448": meta_feat["feat448"], "feat224": meta_feat["feat224"]},
        "seeds": SEEDS,
        "pixels": "float32 N(0,1), already normalised; feat448/feat224 pixels are constant on 7x7 blocks",
        "positions": "arange(T) over the padded row (the official code ignores position_ids); NTK alpha "
                     "from the padded T; logn from the absolute index",
        "long_pos": f"every real non-<imgpad> position + every {LONG_IMAGE_STRIDE}th <imgpad> (slot 0, 16, ..); "
                    "-1 pads the shorter row (its long_logits are 0 there)",
        "gen": f"reference.generate greedy, {N_NEW} new tokens, KV cache; step k logits = what token k was chosen from",
        "trunc": "trunc_logits[K]: finfo(float32).min added to the additive mask at the 256 <imgpad> key "
                 "columns in every decoder layer l >= K; trunc_pos = </img> and every position after it; "
                 "-1 pads the shorter row",
        "ko": "ko_logits (at trunc_pos): finfo(float32).min added to the additive mask at every (query, key) "
              "pair of ko_queries x ko_keys in the layers where ko_layers is 1",
        "cam": "target = sum over answer tokens p of logits[b, p-1, ids[b, p]]; grad and activation at the "
               "ln_2 output of every layer at the 256 <imgpad> positions; np_raw_cam formulas in float64",
        "attn_last": "official output_attentions: probabilities of query T-1 over all T keys, (L, B, H, T)",
    }
    A["meta"] = np.array(json.dumps(meta, sort_keys=True))
    for k, v in A.items():
        if v.dtype.kind == "f":
            assert v.dtype == np.float32 and np.isfinite(v).all(), k
        elif v.dtype.kind in "iu":
            assert v.dtype == np.int32, (k, v.dtype)
    return mdir, A


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refs", default=default_refs(),
                    help="the qwen_vl_v1 reference folder (default: $JAXFLOW_QWEN_VL_REFS or <repo>/../shared/refs/qwen_vl_v1)")
    ap.add_argument("--out", default=HERE, help="output folder (default: this script's folder)")
    args = ap.parse_args(argv)
    qref = import_reference(args.refs)
    qref._setup()
    qref._quiet()
    import torch
    import transformers

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"refs {os.path.abspath(args.refs)}")
    work = tempfile.mkdtemp(prefix="qwen_vl_golden_")
    try:
        mdir, arrays = build(qref, work)
        dst = os.path.join(out, "model")
        os.makedirs(dst, exist_ok=True)
        for f in MODEL_FILES:
            shutil.copyfile(os.path.join(mdir, f), os.path.join(dst, f))
        save_npz(os.path.join(out, "golden.npz"), arrays)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = 0
    print(f"\nwrote {out}")
    for rel in [os.path.join("model", f) for f in MODEL_FILES] + ["golden.npz"]:
        n = os.path.getsize(os.path.join(out, rel))
        total += n
        print(f"  {rel:28s} {n:>10d} B")
    print(f"  {'total':28s} {total:>10d} B ({total / 1e6:.2f} MB)")
    print("\ndigest (sha256 of each array's bytes):")
    for k in sorted(arrays):
        a = arrays[k]
        print(f"  {k:18s} {str(a.dtype):8s} {str(a.shape):18s} {sha(a)}")
    with open(os.path.join(out, "model", "model.safetensors"), "rb") as fh:
        print(f"  {'model.safetensors':18s} {'file':8s} {'':18s} {hashlib.sha256(fh.read()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
