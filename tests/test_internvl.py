"""InternVL end to end against transformers' InternVLForConditionalGeneration (tiny, random, eager):
conversion of a sharded save with the CLI, logits and greedy generation on a left-padded batch of two
images with different tile counts (one with a thumbnail), the truncation sweep against the masked
reference and transformers with image keys masked, CAM gradients against torch autograd and the
attention shares against eager attentions."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxflow  # noqa: E402
import analysis_reference as AR  # noqa: E402
import hf_reference as R  # noqa: E402
import internvl_reference as I  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    hf, jm, _, _ = I.pair()
    return hf, jm


def _torch_logits(hf, ids, mask, pix, **kw):
    return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(R.positions(mask)), **kw)


def test_family_and_image_features(pair):
    hf, jm = pair
    assert jm.family == "internvl"
    _, _, pix, _, _ = I.batch_inputs()
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=torch.tensor(pix)).pooler_output.numpy()
    got = np.asarray(jaxflow.image_features(jm, pix))
    assert got.shape == want.shape == (4, I.TOKENS_PER_TILE, 32)
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_match_transformers(pair, padding):
    hf, jm = pair
    ids, mask, pix, _, _ = I.batch_inputs(padding=padding)
    with torch.no_grad():
        want = _torch_logits(hf, ids, mask, pix).logits.numpy()
    got = np.asarray(jaxflow.forward(jm, ids, pix, mask).logits)
    real = mask.astype(bool)
    err = np.abs(got - want)[real].max()
    assert err <= TOL, f"max |logits diff| {err:.2e}"
    assert np.abs(want).max() > 0.5


def test_greedy_generation_matches_transformers(pair):
    hf, jm = pair
    ids, mask, pix, _, _ = I.batch_inputs(seed=1)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix),
                          attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False, eos_token_id=-1,
                          pad_token_id=0)
    want = out[:, ids.shape[1]:].numpy()
    assert want.shape[1] == 10
    got = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=10, eos_token_id=-1, pad_token_id=0)
    assert (got.tokens == want).all(), f"{got.tokens.tolist()} vs {want.tolist()}"


def _torch_truncated(hf, ids, mask, pix, K):
    layers = hf.model.language_model.layers
    img_cols = torch.tensor(ids == I.IMAGE_TOKEN)[:, None, None, :]

    def hook(module, args, kwargs):
        m = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.where(img_cols, torch.finfo(m.dtype).min, m)
        return args, kwargs

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for l, layer in enumerate(layers) if l >= K]
    try:
        with torch.no_grad():
            return _torch_logits(hf, ids, mask, pix).logits.numpy()
    finally:
        for h in handles:
            h.remove()


def test_truncation_sweep_matches_masked_reference_and_torch(pair):
    hf, jm = pair
    ids, mask, pix, _, _ = I.batch_inputs(seed=3)
    L = jm.config.text.num_layers
    sweep = jaxflow.truncation_sweep(jm, ids, pix, mask)
    assert list(sweep.layers) == list(range(L + 1))
    for vi, K in enumerate(sweep.layers):
        ref = np.asarray(jaxflow.forward(jm, ids, pix, mask, truncate_at=int(K)).logits)
        want = _torch_truncated(hf, ids, mask, pix, int(K))
        for b in range(2):
            pos = sweep.positions[b][sweep.mask[b]]
            assert np.abs(sweep.logits[vi, b, :len(pos)] - ref[b, pos]).max() <= 1e-5, K
            assert np.abs(sweep.logits[vi, b, :len(pos)] - want[b, pos]).max() <= TOL, K
    # the image matters: the untruncated and the fully truncated variants differ
    assert np.abs(sweep.logits[L] - sweep.logits[0]).max() > 1e-3
    gen = jaxflow.truncation_generate(jm, ids, pix, mask, max_new_tokens=4, eos_token_id=-1)
    for vi, K in enumerate(gen.layers):
        one = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=4, eos_token_id=-1, truncate_at=int(K))
        np.testing.assert_array_equal(gen.tokens[vi], one.tokens)


def _torch_site(hf, ids, mask, amask, pix):
    outs = []

    def hook(_m, _i, out):
        out.retain_grad()
        outs.append(out)

    handles = [l.post_attention_layernorm.register_forward_hook(hook) for l in hf.model.language_model.layers]
    try:
        logits = _torch_logits(hf, ids, mask, pix).logits
    finally:
        for h in handles:
            h.remove()
    terms = [logits[b, p - 1, int(ids[b, p])] for b in range(ids.shape[0]) for p in np.flatnonzero(amask[b])]
    torch.stack(terms).sum().backward()
    g = np.stack([o.grad.numpy() for o in outs], 1)  # (B, L, T, D)
    h = np.stack([o.detach().numpy() for o in outs], 1)
    return g, h


def test_cam_matches_torch_autograd_on_stitched_grids(pair):
    hf, jm = pair
    ids, mask, pix, layouts, amask = I.batch_inputs(seed=4, answer_lengths=(2, 3))
    grids = [l.grid for l in layouts]
    g_t, h_t = _torch_site(hf, ids, mask, amask, pix)
    res = jaxflow.llava_cams(jm, ids, pix, amask, attention_mask=mask, tile_grids=grids)
    np.testing.assert_array_equal(res.grids, [[2, 2], [2, 4]])  # 1 tile; 1x2 tiles of 2x2 tokens
    t = I.TOKENS_PER_TILE
    for b, lay in enumerate(layouts):
        pos = np.flatnonzero(ids[b] == I.IMAGE_TOKEN)
        gb, hb = g_t[b][:, pos], h_t[b][:, pos]  # (L, N, D)
        for method in ("paper", "gradcam", "gradxact"):
            raw = AR.np_raw_cam(gb, hb, method)  # (L, N): channel weights pool over all the image's tokens
            if lay.has_thumbnail:  # tiles (0, 0), (0, 1) of 2x2 tokens side by side; thumbnail not drawn
                tiles = raw[:, :lay.rows * lay.cols * t].reshape(-1, lay.cols, 2, 2)
                grid = tiles.transpose(0, 2, 1, 3).reshape(-1, 2, 2 * lay.cols)
            else:
                grid = raw.reshape(-1, 2, 2)
            want = AR.np_normalize(grid.reshape(grid.shape[0], -1)).reshape(grid.shape)
            got = res.maps[method][b][:, :grid.shape[1], :grid.shape[2]]
            assert np.abs(got - want).max() <= 1e-3, (b, method)
            assert np.all(res.maps[method][b][:, grid.shape[1]:, :] == 0)


def test_attention_shares_match_eager_attentions(pair):
    hf, jm = pair
    ids, mask, pix, layouts, amask = I.batch_inputs(seed=5, answer_lengths=(2, 1))
    with torch.no_grad():
        att = np.stack([a.numpy() for a in _torch_logits(hf, ids, mask, pix, output_attentions=True).attentions], 1)
    res = jaxflow.attention_analysis(jm, ids, pix, attention_mask=mask, answer_mask=amask,
                                     tile_grids=[l.grid for l in layouts])
    for b in range(2):
        real = mask[b] > 0
        img = (ids[b] == I.IMAGE_TOKEN) & real
        first = np.flatnonzero(img)[0]
        pos = np.arange(ids.shape[1])
        groups = [real & (pos < first), img, real & (pos > np.flatnonzero(img)[-1]) & ~amask[b]]
        a = att[b].mean(axis=1)[:, np.flatnonzero(amask[b])]  # (L, A, T)
        mass = np.stack([a[..., g].sum(-1) for g in groups], -1)
        want = (mass / mass.sum(-1, keepdims=True)).mean(1)
        np.testing.assert_allclose(res.shares[b], want, atol=1e-5)


def _convert_fails(hf_dir, tmp_path, edit, *phrases):
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    edit(d)
    out = tmp_path / "out"
    res = R.convert_cli(str(d), str(out))
    err = [l for l in res.stderr.strip().splitlines() if l.startswith("error:")]
    assert res.returncode != 0 and len(err) == 1, res.stderr[-2000:]
    for p in phrases:
        assert p in err[0], err[0]
    assert not out.exists()


def test_converter_is_strict_and_names_the_supported_families(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    _, _, hf_dir, _ = I.pair()

    def drop_vision_key(d):
        idx = json.load(open(d / "model.safetensors.index.json"))["weight_map"]
        key = "vision_tower.encoder.layer.1.attention.q_norm.weight"
        f = str(d / idx[key])
        t = load_file(f)
        t.pop(key)
        save_file(t, f, metadata={"format": "pt"})
        idx.pop(key)
        json.dump({"metadata": {}, "weight_map": idx}, open(d / "model.safetensors.index.json", "w"))

    _convert_fails(hf_dir, tmp_path / "a", drop_vision_key, "missing", "q_norm")

    def other_family(d):
        cfg = json.load(open(d / "config.json"))
        cfg["model_type"] = "paligemma"
        json.dump(cfg, open(d / "config.json", "w"))

    _convert_fails(hf_dir, tmp_path / "b", other_family, "model_type='paligemma'", "llava", "internvl", "qwen2_vl",
                   "qwen2_5_vl")


def test_fastv_keep_sets_on_rows_with_different_image_lengths(pair):
    """keep_top_k over rows of 4 and 12 image tokens: the sweep equals the masked reference with the
    keep-set, and kept tokens lie inside each row's own image block."""
    from jaxflow.analysis.truncation import fastv_keep_mask

    _, jm = pair
    ids, mask, pix, _, _ = I.batch_inputs(seed=7)
    k = 3
    sweep = jaxflow.truncation_sweep(jm, ids, pix, mask, keep_top_k=k)
    gen = jaxflow.truncation_generate(jm, ids, pix, mask, keep_top_k=k, max_new_tokens=3, eos_token_id=-1)
    for vi, K in enumerate(sweep.layers):
        keep = fastv_keep_mask(jm, ids, pix, mask, int(K), k)
        assert keep.sum(1).tolist() == [k, k] and not (keep & (ids != I.IMAGE_TOKEN)).any()
        ref = np.asarray(jaxflow.forward(jm, ids, pix, mask, truncate_at=int(K), keep_image_mask=keep).logits)
        for b in range(2):
            pos = sweep.positions[b][sweep.mask[b]]
            assert np.abs(sweep.logits[vi, b, :len(pos)] - ref[b, pos]).max() <= 1e-5, K
        one = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=3, eos_token_id=-1, truncate_at=int(K),
                               keep_image_mask=keep)
        np.testing.assert_array_equal(gen.tokens[vi], one.tokens)
    with pytest.raises(ValueError, match="keep_top_k must be an integer in 0..3"):
        jaxflow.truncation_sweep(jm, ids, pix, mask, keep_top_k=4)  # the one-tile row has 4 image tokens


def test_smoothgrad_and_per_token_maps_on_tiles(pair):
    _, jm = pair
    ids, mask, pix, layouts, amask = I.batch_inputs(seed=8, answer_lengths=(2, 3))
    grids = [l.grid for l in layouts]
    res = jaxflow.llava_cams(jm, ids, pix, amask, attention_mask=mask, tile_grids=grids, per_token=True,
                             smooth_n=2, smooth_sigma=0.1, image_mean=(0.485, 0.456, 0.406),
                             image_std=(0.229, 0.224, 0.225))
    L = jm.config.text.num_layers
    assert res.maps["paper"].shape == (2, L, 2, 4) and res.token_maps["gradxact"].shape == (2, 3, L, 2, 4)
    assert np.isfinite(res.maps["gradcam"]).all() and res.maps["gradcam"].max() == 1.0
    assert (res.token_maps["paper"][0, :, :, :, 2:] == 0).all()  # row 0's grid is 2x2
