"""Qwen2-VL and Qwen2.5-VL end to end against transformers (tiny, random, eager; converted from a
sharded save with the CLI): M-RoPE positions against `get_rope_index`, logits and greedy generation on
a left-padded batch of two images of different sizes and on a batch whose first row holds two images,
the truncation sweep against the masked reference and transformers with image keys masked, truncated
generation, CAM gradients against torch autograd on each image's own grid, attention shares against
eager attentions, and SmoothGrad's noise shared by an image's temporal copies."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxflow  # noqa: E402
import analysis_reference as AR  # noqa: E402
import qwen2_vl_reference as Q  # noqa: E402
from jaxflow.models.qwen2_vl import mrope_positions  # noqa: E402

TOL = 1e-4
CASES = ("two_rows", "multi")


@pytest.fixture(scope="module", params=Q.VERSIONS)
def pair(request):
    hf, jm, _ = Q.pair(request.param)
    return request.param, hf, jm


def _torch_logits(hf, ids, mask, pix, grid, **kw):
    return hf(**Q.torch_kwargs(ids, mask, pix, grid), **kw)


@pytest.mark.parametrize("case", CASES)
def test_positions_equal_get_rope_index(pair, case):
    _, hf, jm = pair
    ids, mask, pix, grid, _ = Q.batch_inputs(case, seed=1)
    kw = Q.torch_kwargs(ids, mask, pix, grid)
    want, deltas = hf.model.get_rope_index(kw["input_ids"], mm_token_type_ids=kw["mm_token_type_ids"],
                                           image_grid_thw=kw["image_grid_thw"], attention_mask=kw["attention_mask"])
    got, got_deltas = mrope_positions(ids, mask, Q.IMAGE_TOKEN, grid, Q.MERGE)
    np.testing.assert_array_equal(got.transpose(2, 0, 1), want.numpy())
    np.testing.assert_array_equal(got_deltas, deltas.numpy()[:, 0])
    assert jm.family == pair[0]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(pair, case):
    _, hf, jm = pair
    ids, mask, pix, grid, _ = Q.batch_inputs(case)
    with torch.no_grad():
        want = _torch_logits(hf, ids, mask, pix, grid).logits.numpy()
    got = np.asarray(jaxflow.forward(jm, ids, pix, mask, image_grid_thw=grid).logits)
    real = mask.astype(bool)
    err = np.abs(got - want)[real].max()
    assert err <= TOL, f"max |logits diff| {err:.2e}"
    assert np.abs(want).max() > 0.5
    ref = np.asarray(jaxflow.forward(jm, ids, pix, mask, attn_impl="reference", image_grid_thw=grid).logits)
    assert np.abs(ref - want)[real].max() <= TOL


def test_image_features_match_transformers(pair):
    _, hf, jm = pair
    _, _, pix, grid, _ = Q.batch_inputs("multi")
    with torch.no_grad():
        want = torch.cat(hf.model.get_image_features(pixel_values=torch.tensor(pix),
                                                     image_grid_thw=torch.tensor(grid)).pooler_output).numpy()
    got = np.asarray(jaxflow.image_features(jm, pix, image_grid_thw=grid))
    assert got.shape == (sum(Q.tokens(g) for g in grid), 64)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(pair, case):
    _, hf, jm = pair
    ids, mask, pix, grid, _ = Q.batch_inputs(case, seed=2)
    with torch.no_grad():
        out = hf.generate(**Q.torch_kwargs(ids, mask, pix, grid), max_new_tokens=8, do_sample=False,
                          eos_token_id=-1, pad_token_id=0)
    want = out[:, ids.shape[1]:].numpy()
    assert want.shape[1] == 8
    got = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=8, eos_token_id=-1, pad_token_id=0, image_grid_thw=grid)
    assert (got.tokens == want).all(), f"{got.tokens.tolist()} vs {want.tolist()}"


def _torch_truncated(hf, ids, mask, pix, grid, K):
    img_cols = torch.tensor(ids == Q.IMAGE_TOKEN)[:, None, None, :]

    def hook(module, args, kwargs):
        m = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.where(img_cols, torch.finfo(m.dtype).min, m)
        return args, kwargs

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for l, layer in enumerate(hf.model.language_model.layers) if l >= K]
    try:
        with torch.no_grad():
            return _torch_logits(hf, ids, mask, pix, grid).logits.numpy()
    finally:
        for h in handles:
            h.remove()


def _sweep_vs(sweep, vi, full):
    worst = 0.0
    for b in range(sweep.mask.shape[0]):
        pos = sweep.positions[b][sweep.mask[b]]
        worst = max(worst, float(np.abs(sweep.logits[vi, b, :len(pos)] - full[b, pos]).max()))
    return worst


def test_sweep_on_two_images_in_a_row(pair):
    """The own tokens are every non-image token after the row's first image (the text between the
    two images included); every K equals the masked reference and transformers."""
    _, hf, jm = pair
    ids, mask, pix, grid, _ = Q.batch_inputs("multi", seed=3)
    sweep = jaxflow.truncation_sweep(jm, ids, pix, mask, image_grid_thw=grid)
    L = jm.config.text.num_layers
    first = np.flatnonzero(ids[0] == Q.IMAGE_TOKEN)[0]
    own = np.flatnonzero((ids[0] != Q.IMAGE_TOKEN) & (mask[0] > 0) & (np.arange(ids.shape[1]) > first))
    np.testing.assert_array_equal(sweep.positions[0][sweep.mask[0]], own)
    for vi, K in enumerate(sweep.layers):
        ref = np.asarray(jaxflow.forward(jm, ids, pix, mask, truncate_at=int(K), image_grid_thw=grid).logits)
        assert _sweep_vs(sweep, vi, ref) <= 1e-5, K
        assert _sweep_vs(sweep, vi, _torch_truncated(hf, ids, mask, pix, grid, int(K))) <= TOL, K
    assert np.abs(sweep.logits[L] - sweep.logits[0]).max() > 1e-3
    gen = jaxflow.truncation_generate(jm, ids, pix, mask, max_new_tokens=4, eos_token_id=-1, image_grid_thw=grid)
    for vi, K in enumerate(gen.layers):
        one = jaxflow.generate(jm, ids, pix, mask, max_new_tokens=4, eos_token_id=-1, truncate_at=int(K),
                               image_grid_thw=grid)
        np.testing.assert_array_equal(gen.tokens[vi], one.tokens)
    with pytest.raises(ValueError, match="one image per row"):
        jaxflow.truncation_sweep(jm, ids, pix, mask, keep_top_k=2, image_grid_thw=grid)


def _torch_site(hf, ids, mask, amask, pix, grid):
    outs = []

    def hook(_m, _i, out):
        out.retain_grad()
        outs.append(out)

    handles = [l.post_attention_layernorm.register_forward_hook(hook) for l in hf.model.language_model.layers]
    try:
        logits = _torch_logits(hf, ids, mask, pix, grid).logits
    finally:
        for h in handles:
            h.remove()
    terms = [logits[b, p - 1, int(ids[b, p])] for b in range(ids.shape[0]) for p in np.flatnonzero(amask[b])]
    torch.stack(terms).sum().backward()
    return np.stack([o.grad.numpy() for o in outs], 1), np.stack([o.detach().numpy() for o in outs], 1)


def test_cam_matches_torch_autograd_on_each_images_grid(pair):
    _, hf, jm = pair
    ids, mask, pix, grid, amask = Q.batch_inputs("two_rows", seed=4, answer_lengths=(2, 3))
    g_t, h_t = _torch_site(hf, ids, mask, amask, pix, grid)
    res = jaxflow.llava_cams(jm, ids, pix, amask, attention_mask=mask, image_grid_thw=grid)
    shapes = [(g[1] // Q.MERGE, g[2] // Q.MERGE) for g in grid]
    np.testing.assert_array_equal(res.grids, shapes)
    for b, (gh, gw) in enumerate(shapes):
        pos = np.flatnonzero(ids[b] == Q.IMAGE_TOKEN)
        for method in ("paper", "gradcam", "gradxact"):
            raw = AR.np_raw_cam(g_t[b][:, pos], h_t[b][:, pos], method)  # (L, N), tokens row-major
            want = AR.np_normalize(raw).reshape(-1, gh, gw)
            got = res.maps[method][b]
            assert np.abs(got[:, :gh, :gw] - want).max() <= 1e-3, (b, method)
            assert np.all(got[:, gh:, :] == 0) and np.all(got[:, :, gw:] == 0)


def test_cam_of_two_images_in_a_row(pair):
    """One map per image (row 0 holds images a and c, row 1 image b), each pooling its own tokens."""
    _, hf, jm = pair
    ids, mask, pix, grid, amask = Q.batch_inputs("multi", seed=4, answer_lengths=(2, 3))
    g_t, h_t = _torch_site(hf, ids, mask, amask, pix, grid)
    res = jaxflow.llava_cams(jm, ids, pix, amask, attention_mask=mask, image_grid_thw=grid, per_token=True)
    np.testing.assert_array_equal(res.image_rows, [0, 0, 1])
    np.testing.assert_array_equal(res.grids, [(g[1] // Q.MERGE, g[2] // Q.MERGE) for g in grid])
    assert res.token_maps["paper"].shape[:2] == (3, 3)
    seen = {0: 0, 1: 0}
    for i, (r, g) in enumerate(zip(res.image_rows, grid)):
        n, (gh, gw) = Q.tokens(g), res.grids[i]
        pos = np.flatnonzero(ids[r] == Q.IMAGE_TOKEN)[seen[r]:seen[r] + n]
        seen[r] += n
        for method in ("paper", "gradcam", "gradxact"):
            want = AR.np_normalize(AR.np_raw_cam(g_t[r][:, pos], h_t[r][:, pos], method)).reshape(-1, gh, gw)
            assert np.abs(res.maps[method][i][:, :gh, :gw] - want).max() <= 1e-3, (i, method)


@pytest.mark.parametrize("case", CASES)
def test_attention_shares_match_eager_attentions(pair, case):
    _, hf, jm = pair
    ids, mask, pix, grid, amask = Q.batch_inputs(case, seed=5, answer_lengths=(2, 1))
    with torch.no_grad():
        att = np.stack([a.numpy() for a in _torch_logits(hf, ids, mask, pix, grid, output_attentions=True).attentions],
                       1)
    res = jaxflow.attention_analysis(jm, ids, pix, attention_mask=mask, answer_mask=amask, image_grid_thw=grid)
    for b in range(2):
        real = mask[b] > 0
        img = (ids[b] == Q.IMAGE_TOKEN) & real
        pos = np.arange(ids.shape[1])
        # S before the first image; T every image token; U the rest after the first image (text between)
        groups = [real & (pos < np.flatnonzero(img)[0]), img, real & (pos > np.flatnonzero(img)[0]) & ~img & ~amask[b]]
        a = att[b].mean(axis=1)[:, np.flatnonzero(amask[b])]  # (L, A, T)
        mass = np.stack([a[..., g].sum(-1) for g in groups], -1)
        np.testing.assert_allclose(res.shares[b], (mass / mass.sum(-1, keepdims=True)).mean(1), atol=1e-5)
    assert res.image_maps.shape[0] == len(grid) and list(res.image_rows) == ([0, 1] if case == "two_rows" else [0, 0, 1])


def test_smoothgrad_noise_is_shared_by_temporal_copies(pair):
    import jax

    _, _, jm = pair
    ids, mask, pix, grid, _ = Q.batch_inputs("two_rows")
    images = jm.image_inputs(ids, mask, pix, image_grid_thw=grid)
    noisy = jm.noisy_images(jax.random.PRNGKey(0), images, 3, 0.1, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    px = np.asarray(noisy["pixel_values"]).reshape(3, pix.shape[0], 3, Q.TEMPORAL, Q.PATCH, Q.PATCH)
    diff = px - pix.reshape(1, pix.shape[0], 3, Q.TEMPORAL, Q.PATCH, Q.PATCH)
    np.testing.assert_allclose(diff[:, :, :, 0], diff[:, :, :, 1], atol=1e-6)  # the same draw on both copies
    assert 0.2 < np.std(diff[:, :, 0] * 0.2) / 0.1 < 5  # noise of std sigma on the [0, 1] scale
    np.testing.assert_array_equal(np.asarray(noisy["positions"][1]), np.asarray(images["positions"]))


def test_missing_image_grid_thw_is_one_clear_error(pair):
    _, _, jm = pair
    ids, mask, pix, grid, _ = Q.batch_inputs("two_rows")
    with pytest.raises(ValueError, match="image_grid_thw"):
        jaxflow.forward(jm, ids, pix, mask)
    with pytest.raises(ValueError, match=r"pixel_values must be \("):
        jaxflow.forward(jm, ids, pix[:-4], mask, image_grid_thw=grid)
    with pytest.raises(ValueError, match="image tokens"):
        jaxflow.forward(jm, ids, pix, mask, image_grid_thw=grid[::-1])


def test_converter_is_strict_on_the_qwen_layout(tmp_path):
    """A missing vision tensor, a decoder tensor of the wrong shape and an mrope_section that does not
    fit the head size each fail with one line naming the problem, writing nothing."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    import hf_reference as R

    hf_dir = Q.pair("qwen2_5_vl")[2]

    def attempt(name, edit, *phrases):
        d = tmp_path / name / "hf"
        shutil.copytree(hf_dir, d)
        edit(d)
        out = tmp_path / name / "out"
        res = R.convert_cli(str(d), str(out))
        err = [l for l in res.stderr.strip().splitlines() if l.startswith("error:")]
        assert res.returncode != 0 and len(err) == 1, res.stderr[-2000:]
        for p in phrases:
            assert p in err[0], err[0]
        assert not out.exists()

    def edit_tensor(key, fn):
        def edit(d):
            idx = json.load(open(d / "model.safetensors.index.json"))["weight_map"]
            f = str(d / idx[key])
            t = load_file(f)
            if fn(t) == "dropped":
                idx.pop(key)
                json.dump({"metadata": {}, "weight_map": idx}, open(d / "model.safetensors.index.json", "w"))
            save_file(t, f, metadata={"format": "pt"})
        return edit

    def drop(t):
        t.pop("visual.blocks.2.attn.qkv.weight")
        return "dropped"

    attempt("missing", edit_tensor("visual.blocks.2.attn.qkv.weight", drop), "missing", "visual.blocks.2.attn.qkv.weight")
    attempt("shape", edit_tensor("model.layers.1.mlp.up_proj.weight",
                                 lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", np.zeros((3, 64), np.float32))),
            "wrong shape", "up_proj")

    def bad_section(d):
        cfg = json.load(open(d / "config.json"))
        cfg["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
        json.dump(cfg, open(d / "config.json", "w"))

    attempt("section", bad_section, "mrope_section", "head_dim / 2")
