"""Prompt formatting, batch encoding, token groups and the tiny tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from jaxflow.data.prompts import (
    VICUNA_V1_SYSTEM,
    EncodedBatch,
    encode_batch,
    format_prompt,
    token_spans,
)
from jaxflow.data.tiny_tokenizer import (
    TINY_BOS,
    TINY_EOS,
    TINY_IMAGE_TOKEN_ID,
    TINY_PAD,
    TINY_VOCAB_SIZE,
    build_tiny_tokenizer,
    tiny_vocab,
)

IMG = TINY_IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab()


# ---------------------------------------------------------------- format_prompt


def test_system_prompt_text():
    assert VICUNA_V1_SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions."
    )


def test_format_prompt_vicuna():
    assert format_prompt("What is this?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT:"
    )


def test_format_prompt_llava_hf_and_custom_token():
    assert format_prompt("Is it red?", template="llava_hf") == "USER: <image>\nIs it red? ASSISTANT:"
    assert format_prompt("Q", template="llava_hf", image_token="<img>") == "USER: <img>\nQ ASSISTANT:"


def test_format_prompt_errors():
    with pytest.raises(ValueError, match="vicuna_v1.*llava_hf"):
        format_prompt("q", template="chatml")
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            format_prompt(empty)


# ---------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_constants(tok, vocab):
    assert len(tok) == TINY_VOCAB_SIZE == len(vocab) <= 512
    assert sorted(vocab.values()) == list(range(TINY_VOCAB_SIZE))
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"], vocab["<pad>"], vocab["<image>"]) == (0, 1, 2, 3, 4)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (TINY_BOS, TINY_EOS, TINY_PAD)
    assert tok.convert_tokens_to_ids("<image>") == IMG
    assert f"<extra_{0}>" in vocab


def test_tiny_tokenizer_encodes_words(tok, vocab):
    ids = tok("USER: <image>\nIs there a red circle? ASSISTANT:").input_ids
    words = ["<s>", "USER", ":", "<image>", "Is", "there", "a", "red", "circle", "?", "ASSISTANT", ":"]
    assert ids == [vocab[w] for w in words]
    assert tok("zebra", add_special_tokens=False).input_ids == [0]  # unknown word
    assert tok("12", add_special_tokens=False).input_ids == [vocab["1"], vocab["2"]]
    assert tok.decode(tok("a red circle", add_special_tokens=False).input_ids) == "a red circle"


def test_tiny_tokenizer_covers_system_prompt(tok):
    ids = tok(format_prompt("Describe the image.")).input_ids
    assert 0 not in ids  # no <unk>
    assert ids[0] == TINY_BOS and ids.count(IMG) == 1


def test_tiny_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [
        format_prompt("Is there a green triangle in the image?\nAnswer the question using a single word or phrase."),
        format_prompt("What colour is the square?", template="llava_hf"),
        "yes",
        "no, 3 blue squares <image> unknownword!",
    ]
    for text in texts:
        for special in (True, False):
            assert loaded(text, add_special_tokens=special).input_ids == tok(text, add_special_tokens=special).input_ids
    assert len(loaded) == TINY_VOCAB_SIZE
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (TINY_BOS, TINY_EOS, TINY_PAD)


def test_tiny_tokenizer_is_deterministic(tok):
    other = build_tiny_tokenizer()
    assert other.get_vocab() == tok.get_vocab()
    text = format_prompt("Is there a red circle?")
    assert other(text).input_ids == tok(text).input_ids


# ---------------------------------------------------------------- encode_batch


def _ids(vocab, words):
    return [vocab[w] for w in words]


def test_encode_batch_left_padding_with_answers(tok, vocab):
    prompts = ["USER: <image>\nIs it red? ASSISTANT:", "USER: <image>\nWhat shape? ASSISTANT:"]
    batch = encode_batch(
        tok, prompts, image_token="<image>", image_token_id=IMG, num_image_tokens=3, answers=["yes", "a blue square"]
    )
    assert isinstance(batch, EncodedBatch)
    # Derived by hand from the vocabulary.
    row0 = _ids(vocab, ["<s>", "USER", ":"]) + [IMG] * 3 + _ids(vocab, ["Is", "it", "red", "?", "ASSISTANT", ":", "yes"])
    row1 = (
        _ids(vocab, ["<s>", "USER", ":"])
        + [IMG] * 3
        + _ids(vocab, ["What", "shape", "?", "ASSISTANT", ":", "a", "blue", "square"])
    )
    assert len(row0) == 13 and len(row1) == 14
    expected_ids = np.array([[TINY_PAD] + row0, row1], dtype=np.int32)
    np.testing.assert_array_equal(batch.input_ids, expected_ids)
    assert batch.input_ids.dtype == np.int32 and batch.attention_mask.dtype == np.int32
    np.testing.assert_array_equal(batch.attention_mask, np.array([[0] + [1] * 13, [1] * 14]))
    expected_answer = np.zeros((2, 14), bool)
    expected_answer[0, 13] = True
    expected_answer[1, 11:14] = True
    np.testing.assert_array_equal(batch.answer_mask, expected_answer)
    np.testing.assert_array_equal(batch.prompt_lengths, [12, 11])
    np.testing.assert_array_equal(batch.lengths, [13, 14])


def test_encode_batch_right_padding_no_answers(tok, vocab):
    prompts = ["USER: <image>\nIs there a circle? ASSISTANT:", "USER: <image>\nWhy? ASSISTANT:"]
    batch = encode_batch(
        tok, prompts, image_token="<image>", image_token_id=IMG, num_image_tokens=2, padding_side="right", pad_token_id=99
    )
    row0 = _ids(vocab, ["<s>", "USER", ":"]) + [IMG] * 2 + _ids(vocab, ["Is", "there", "a", "circle", "?", "ASSISTANT", ":"])
    row1 = _ids(vocab, ["<s>", "USER", ":"]) + [IMG] * 2 + _ids(vocab, ["Why", "?", "ASSISTANT", ":"])
    np.testing.assert_array_equal(batch.input_ids, np.array([row0, row1 + [99, 99, 99]], dtype=np.int32))
    np.testing.assert_array_equal(batch.attention_mask, np.array([[1] * 12, [1] * 9 + [0] * 3]))
    assert not batch.answer_mask.any()
    np.testing.assert_array_equal(batch.prompt_lengths, [12, 9])


def test_encode_batch_matches_llava_processor_expansion(tok):
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    from PIL import Image

    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=tok,
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        image_token="<image>",
    )
    prompt = format_prompt("Is there a red circle in the image?")
    ref = proc(images=[Image.new("RGB", (60, 60))], text=[prompt], return_tensors="np")["input_ids"]
    ours = encode_batch(tok, [prompt], image_token="<image>", image_token_id=IMG, num_image_tokens=16)
    np.testing.assert_array_equal(ours.input_ids, ref)


def test_encode_batch_errors(tok):
    kw = dict(image_token="<image>", image_token_id=IMG, num_image_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 has 0 image tokens"):
        encode_batch(tok, ["USER: <image>\nhi", "USER: no image"], **kw)
    with pytest.raises(ValueError, match="prompt 0 has 2 image tokens"):
        encode_batch(tok, ["<image> <image> hi"], **kw)
    with pytest.raises(ValueError, match="no tokens"):
        encode_batch(tok, ["USER: <image>\nhi"], answers=[""], **kw)
    with pytest.raises(ValueError, match="image token"):
        encode_batch(tok, ["USER: <image>\nhi"], image_token="<image>", image_token_id=7, num_image_tokens=2)


def test_encode_batch_pad_id_fallback(tok):
    class NoPad:
        pad_token_id = None
        eos_token_id = TINY_EOS

        def __call__(self, text, add_special_tokens=True):
            return tok(text, add_special_tokens=add_special_tokens)

        def convert_tokens_to_ids(self, token):
            return tok.convert_tokens_to_ids(token)

    batch = encode_batch(
        NoPad(), ["USER: <image>\nIs it red?", "<image>"], image_token="<image>", image_token_id=IMG, num_image_tokens=1
    )
    assert batch.input_ids[1, 0] == TINY_EOS and batch.attention_mask[1, 0] == 0


def test_encode_batch_then_token_spans(tok):
    prompts = [format_prompt("Is it red?"), format_prompt("What shape is it?", template="llava_hf")]
    batch = encode_batch(
        tok, prompts, image_token="<image>", image_token_id=IMG, num_image_tokens=4, answers=["no", "a circle"]
    )
    spans = token_spans(batch.input_ids, batch.attention_mask, IMG, batch.answer_mask)
    counts = spans.counts()
    n_sys0 = len(tok(VICUNA_V1_SYSTEM + " USER:").input_ids)
    np.testing.assert_array_equal(counts["system"], [n_sys0, 3])  # <s> ... USER :
    np.testing.assert_array_equal(counts["image"], [4, 4])
    np.testing.assert_array_equal(counts["answer"], [1, 2])
    total = counts["system"] + counts["image"] + counts["user"] + counts["answer"]
    np.testing.assert_array_equal(total, batch.lengths)


# ---------------------------------------------------------------- token_spans


def test_token_spans_left_padding():
    # pad pad | S S | I I I | U U | A      (0 = pad, 4 = image, other ids arbitrary)
    ids = np.array(
        [
            [0, 0, 1, 9, 4, 4, 4, 7, 8, 6],
            [1, 9, 9, 4, 4, 4, 7, 8, 8, 6],
        ]
    )
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    answer = np.array([[0] * 9 + [1], [0] * 8 + [1, 1]], bool)
    s = token_spans(ids, mask, 4, answer)
    np.testing.assert_array_equal(s.system, [[0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(s.image, [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(s.user, [[0, 0, 0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(s.answer, answer)
    np.testing.assert_array_equal(s.image_start, [4, 3])
    np.testing.assert_array_equal(s.image_end, [7, 6])
    assert s.ranges() == [
        {"system": (2, 4), "image": (4, 7), "user": (7, 9), "answer": (9, 10)},
        {"system": (0, 3), "image": (3, 6), "user": (6, 8), "answer": (8, 10)},
    ]
    d = s.as_dict()
    assert set(d) == {"system", "image", "user", "answer", "image_start", "image_end"}
    assert "row 1" in s.summary()


def test_token_spans_right_padding_no_answer():
    # S | I I | U U U | pad pad   ; second row: S S | I I | U | pad x3 (pad id happens to be 4!)
    ids = np.array(
        [
            [1, 4, 4, 5, 6, 7, 3, 3],
            [1, 2, 4, 4, 5, 4, 4, 4],
        ]
    )
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    s = token_spans(ids, mask, 4)
    np.testing.assert_array_equal(s.system, [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(s.image, [[0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(s.user, [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]])
    assert not s.answer.any()
    np.testing.assert_array_equal(s.image_start, [1, 2])
    np.testing.assert_array_equal(s.image_end, [3, 4])
    assert s.ranges()[0]["answer"] is None


def test_token_spans_errors():
    ids = np.array([[1, 4, 4, 5], [1, 5, 6, 7]])
    with pytest.raises(ValueError, match="row 1 has no image token"):
        token_spans(ids, np.ones_like(ids), 4)
    # two images in a row: the text between them is U, both images are T
    two = token_spans(np.array([[1, 4, 4, 5, 4, 6]]), np.ones((1, 6), int), 4)
    np.testing.assert_array_equal(two.image, [[0, 1, 1, 0, 1, 0]])
    np.testing.assert_array_equal(two.user, [[0, 0, 0, 1, 0, 1]])
    np.testing.assert_array_equal(two.system, [[1, 0, 0, 0, 0, 0]])
    # An image token hidden by the mask does not count.
    with pytest.raises(ValueError, match="row 0 has no image token"):
        token_spans(np.array([[4, 1, 5]]), np.array([[0, 1, 1]]), 4)
