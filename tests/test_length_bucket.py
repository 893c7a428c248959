"""The scripts' sequence-length bucket: left padding to a multiple of SCRIPT_LENGTH_BUCKET changes
no result (positions count real tokens), so questions of similar length share compiled programs."""
from types import SimpleNamespace

import numpy as np

import jaxflow
from jaxflow.pipeline import SCRIPT_LENGTH_BUCKET, answer, encode, length_bucket_for, load_bundle

IMAGE = jaxflow.__path__[0] + "/assets/demo.png"


def test_bucketed_prompts_compute_what_unpadded_ones_do():
    bundle = load_bundle(None)
    qs = ["Is there a red circle in the image?", "Is there a blue square?"]
    plain, px = encode(bundle, [IMAGE] * 2, qs)
    padded, px2 = encode(bundle, [IMAGE] * 2, qs, length_bucket=SCRIPT_LENGTH_BUCKET)
    assert padded.input_ids.shape[1] % SCRIPT_LENGTH_BUCKET == 0 and padded.input_ids.shape[1] > plain.input_ids.shape[1]
    extra = padded.input_ids.shape[1] - plain.input_ids.shape[1]
    assert (padded.attention_mask[:, :extra] == 0).all()
    np.testing.assert_array_equal(padded.input_ids[:, extra:], plain.input_ids)
    a = jaxflow.forward(bundle.model, plain.input_ids, px, plain.attention_mask).logits
    b = jaxflow.forward(bundle.model, padded.input_ids, px2, padded.attention_mask).logits
    real = plain.attention_mask > 0
    np.testing.assert_allclose(np.asarray(b)[:, extra:][real], np.asarray(a)[real], atol=1e-4, rtol=1e-4)
    assert answer(bundle, [IMAGE], qs[:1], max_new_tokens=4).texts == \
        answer(bundle, [IMAGE], qs[:1], max_new_tokens=4, length_bucket=SCRIPT_LENGTH_BUCKET).texts


def test_no_bucket_where_padding_changes_results():
    # Qwen-VL: RoPE at the padded index and the NTK factor from the padded length
    from jaxflow.models.llava import Llava
    from jaxflow.models.qwen_vl import QwenVL

    assert length_bucket_for(SimpleNamespace(model=QwenVL.__new__(QwenVL)), 32) is None
    assert length_bucket_for(SimpleNamespace(model=Llava.__new__(Llava)), 32) == 32
