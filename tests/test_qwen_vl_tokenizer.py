"""The Qwen-VL (v1) tokenizer rebuilt without remote code or tiktoken, against the official one.

The golden cases (tests/golden/qwen_vl/tokenizer_cases.json) hold the official QWenTokenizer's ids; the
real vocabulary comes from the committed qwen.tiktoken.gz, so everything but the regeneration test runs on
a fresh clone. The tokenizer is built once per module, with tiktoken made unimportable while it is built
and while the saved copy is loaded back.
"""
import contextlib
import gzip
import hashlib
import importlib.util
import json
import os
import sys
import unicodedata

import pytest

from jaxflow.data import qwen_vl_tokenizer as Q

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "qwen_vl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFS = os.environ.get("JAXFLOW_QWEN_VL_REFS",
                      os.path.join(REPO, "..", "shared", "refs", "qwen_vl_v1"))


@contextlib.contextmanager
def no_tiktoken():
    """`import tiktoken` raises ImportError inside the block."""
    saved = sys.modules.get("tiktoken", False)
    sys.modules["tiktoken"] = None
    try:
        yield
    finally:
        if saved is False:
            del sys.modules["tiktoken"]
        else:
            sys.modules["tiktoken"] = saved


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(GOLDEN, "tokenizer_cases.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_vl_vocab")
    path = d / "qwen.tiktoken"
    with gzip.open(os.path.join(GOLDEN, "qwen.tiktoken.gz"), "rb") as src:
        path.write_bytes(src.read())
    return str(path)


@pytest.fixture(scope="module")
def tok(vocab_file):
    with no_tiktoken():
        return Q.build_qwen_vl_tokenizer(vocab_file)


def test_vocab_file_is_the_golden_one(vocab_file, golden):
    with open(vocab_file, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == golden["vocab_sha256"]
    ranks = Q.read_tiktoken_ranks(vocab_file)
    assert len(ranks) == golden["n_ranks"] == Q.QWEN_VL_NUM_RANKS
    assert ranks[b"!"] == 0 and ranks[b"Hello"] == 9707


def test_special_ids(tok):
    ids = tok.convert_tokens_to_ids
    assert ids("<|endoftext|>") == 151643 == Q.ENDOFTEXT_ID
    assert ids("<|im_start|>") == 151644 and ids("<|im_end|>") == 151645
    assert ids("<|extra_0|>") == 151646 and ids("<|extra_204|>") == 151850
    assert [ids(t) for t in Q.IMAGE_ST] == list(range(151851, 151860))
    assert (ids("<img>"), ids("</img>"), ids("<imgpad>")) == (151857, 151858, 151859)
    assert Q.image_token_ids(tok) == (Q.IMAGE_START_ID, Q.IMAGE_END_ID, Q.IMAGE_PAD_ID)
    assert [ids(t) for t in Q.SPECIAL_TOKENS] == list(range(151643, 151643 + len(Q.SPECIAL_TOKENS)))
    assert len(tok) == 151860
    assert tok.eos_token_id == tok.pad_token_id == 151643
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok("Hi").input_ids == tok("Hi", add_special_tokens=False).input_ids == [13048]  # no BOS


def test_golden_ids(tok, golden):
    bad = []
    for c in golden["cases"]:
        if Q.encode_official(tok, c["text"]) != c["ids"]:
            bad.append(c["text"])
        elif not c["image"] and tok(c["text"]).input_ids != c["ids"]:
            bad.append(c["text"])
    assert not bad, f"{len(bad)} of {len(golden['cases'])} cases differ, e.g. {bad[:3]!r}"
    n_img = sum(c["image"] for c in golden["cases"])
    assert len(golden["cases"]) == 200 and n_img >= 20


def test_batch_left_padding(tok, golden):
    texts = [c["text"] for c in golden["cases"] if not c["image"]][:8]
    tok.padding_side = "left"
    try:
        batch = tok(texts, padding="longest")
    finally:
        tok.padding_side = "right"
    width = max(len(tok(t).input_ids) for t in texts)
    for t, ids, mask in zip(texts, batch.input_ids, batch.attention_mask):
        n = len(tok(t).input_ids)
        assert len(ids) == width and ids[width - n:] == tok(t).input_ids
        assert ids[:width - n] == [151643] * (width - n) and mask == [0] * (width - n) + [1] * n


def test_decode_round_trip(tok, golden):
    for c in golden["cases"]:
        if c["image"]:
            continue
        assert tok.decode(c["ids"]) == c["decoded"] == unicodedata.normalize("NFC", c["text"]), c["text"]
        assert tok.decode(c["ids"], skip_special_tokens=True) == c["decoded_skip_special"], c["text"]


def test_image_placeholder(tok):
    assert tok(Q.IMAGE_PLACEHOLDER).input_ids == [151857] + [151859] * 256 + [151858]
    ids = tok("Picture 1:" + Q.IMAGE_PLACEHOLDER + "\nWhat is it? Answer:").input_ids
    assert ids.count(151859) == 256 and ids.index(151857) + 257 == ids.index(151858)


def test_encode_official_errors(tok, golden):
    assert golden["error_cases"]
    for c in golden["error_cases"]:
        with pytest.raises(ValueError) as err:
            Q.encode_official(tok, c["text"])
        msg = str(err.value)
        assert "\n" not in msg
        if c["official_error"].startswith("ValueError: "):
            assert msg == c["official_error"][len("ValueError: "):]


def test_save_and_autotokenizer_reload(tok, golden, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    assert "tokenizer.json" in names and not [n for n in names if n.endswith((".py", ".tiktoken"))]
    with open(tmp_path / "tokenizer_config.json") as fh:
        assert "auto_map" not in json.load(fh)
    with no_tiktoken():
        loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    texts = [c["text"] for c in golden["cases"]]
    assert loaded(texts).input_ids == tok(texts).input_ids
    for c in golden["cases"]:
        assert Q.encode_official(loaded, c["text"]) == c["ids"], c["text"]
        if not c["image"]:
            assert loaded.decode(c["ids"]) == c["decoded"], c["text"]
    assert Q.image_token_ids(loaded) == (151857, 151858, 151859)
    assert loaded.eos_token_id == loaded.pad_token_id == 151643 and loaded.bos_token_id is None
    assert len(loaded) == len(tok)


def _tiny_vocab(path, extra=(b"ab", b"abc")):
    import base64

    tokens = [bytes([b]) for b in range(256)] + list(extra)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return len(tokens)


def test_dir_helpers_with_a_small_vocab(tmp_path):
    assert not Q.is_qwen_vl_tokenizer_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        Q.load_qwen_vl_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "qwen.tiktoken" in str(err.value) and "\n" not in str(err.value)
    n = _tiny_vocab(tmp_path / "qwen.tiktoken")
    assert Q.is_qwen_vl_tokenizer_dir(str(tmp_path))
    assert not Q.is_qwen_vl_tokenizer_dir(str(tmp_path / "qwen.tiktoken"))
    with no_tiktoken():
        small = Q.load_qwen_vl_tokenizer(str(tmp_path))
    assert small.convert_tokens_to_ids("<|endoftext|>") == n
    assert small.convert_tokens_to_ids("<imgpad>") == n + len(Q.SPECIAL_TOKENS) - 1
    assert small("abc ab<|im_end|>").input_ids == [n - 1, 32, n - 2, n + 2]


@pytest.mark.parametrize("content, what", [
    (b"IQ== 0\nIg==\n", "line 2"),                 # one field
    (b"IQ== 0\n!!!! 1\n", "line 2"),               # not base64
    (b"IQ== 0\nIg== one\n", "line 2"),             # rank not an integer
    (b"IQ== 0\nIg== 1 2\n", "line 2"),             # three fields
    (b"IQ== 0\n\nIQ== 1\n", "line 3 repeats"),     # the same token twice
    (b"IQ== 0\nIg== 2\n", "not exactly 0..1"),     # a gap in the ranks
    (b"IQ== 1\nIg== 1\n", "not exactly 0..1"),     # a rank twice
    (b"\n\n", "no '<base64 token> <rank>' lines"),
])
def test_read_tiktoken_ranks_errors(tmp_path, content, what):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        Q.read_tiktoken_ranks(str(path))
    msg = str(err.value)
    assert msg.startswith(str(path) + ":") and what in msg and "\n" not in msg


def test_regenerate_golden_with_the_official_tokenizer(golden):
    if not os.path.isdir(os.path.join(REFS, "remote")):
        pytest.skip(f"no Qwen-VL refs folder at {REFS} (set JAXFLOW_QWEN_VL_REFS)")
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        pytest.skip("tiktoken is not importable (the official tokenizer needs it)")
    spec = importlib.util.spec_from_file_location(
        "make_golden_tokenizer", os.path.join(GOLDEN, "make_golden_tokenizer.py"))
    mod = importlib.util.module_from_spec(spec)
    dont, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in tests/golden
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = dont
    try:
        data = mod.make_cases(REFS)
    except ModuleNotFoundError as e:  # tokenization_qwen.py imports torch, matplotlib, PIL, requests
        pytest.skip(f"the official tokenizer module cannot be imported here: {e}")
    official = mod.load_official(REFS)
    module = sys.modules[type(official).__module__]
    assert module.PAT_STR == Q.QWEN_VL_PAT_STR and module.IMG_TOKEN_SPAN == Q.IMG_TOKEN_SPAN
    assert tuple(official.special_tokens) == Q.SPECIAL_TOKENS  # names in id order
    assert data == golden
    with open(os.path.join(GOLDEN, "tokenizer_cases.json"), encoding="utf-8") as fh:
        assert mod.dumps(data) == fh.read()
