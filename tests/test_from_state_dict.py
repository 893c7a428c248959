"""`jaxflow.from_state_dict`: an in-memory transformers model -> a jaxflow model, no files, as strict
as the file converter; equal to the converted checkpoint (LLaVA) and to transformers' logits (InternVL)."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxflow  # noqa: E402
import hf_reference as R  # noqa: E402
import internvl_reference as I  # noqa: E402
from jaxflow.convert import ConversionError  # noqa: E402
from jaxflow.convert.checkpoint import model_params  # noqa: E402


def test_llava_equals_the_converted_checkpoint(converted_pair):
    hf, converted = converted_pair("mha")
    model = jaxflow.from_state_dict(hf.config, hf.state_dict())
    got, want = model_params(model), model_params(converted)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    half = jaxflow.from_state_dict(hf.config.to_dict(), hf.state_dict(), "bfloat16")
    for g, w in zip(jax.tree.leaves(model_params(half)), jax.tree.leaves(want)):
        assert g.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w).astype(g.dtype))


def test_internvl_logits_match_transformers():
    hf = I.build_hf_model()
    model = jaxflow.from_state_dict(hf.config, hf.state_dict())
    assert model.family == "internvl"
    ids, mask, pix, _, _ = I.batch_inputs()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(R.positions(mask))).logits.numpy()
    got = np.asarray(jaxflow.forward(model, ids, pix, mask).logits)
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=1e-4, rtol=1e-4)


def test_strict_about_names_shapes_and_config():
    hf = R.build_hf_model("mha")
    sd = dict(hf.state_dict())
    missing = {k: v for k, v in sd.items() if "layers.0.mlp.up_proj" not in k}
    with pytest.raises(ConversionError, match="missing tensor.*up_proj"):
        jaxflow.from_state_dict(hf.config, missing)
    extra = dict(sd, **{"model.language_model.extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match="unused tensor.*extra"):
        jaxflow.from_state_dict(hf.config, extra)
    key = next(k for k in sd if k.endswith("layers.0.mlp.up_proj.weight"))
    wrong = dict(sd, **{key: torch.zeros(3, 3)})
    with pytest.raises(ConversionError, match="wrong shape"):
        jaxflow.from_state_dict(hf.config, wrong)
    with pytest.raises(ConversionError, match="model_type"):
        jaxflow.from_state_dict({"model_type": "not-a-vlm"}, sd)
    with pytest.raises(ConversionError, match="dtype"):
        jaxflow.from_state_dict(hf.config, sd, "int8")
