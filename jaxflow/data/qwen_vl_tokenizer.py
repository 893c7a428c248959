"""The official Qwen-VL (v1, 2023) tokenizer as a plain ``tokenizers`` fast tokenizer: no remote code, no tiktoken.

The official ``QWenTokenizer`` (``tokenization_qwen.py`` in the Qwen-VL repos) is tiktoken BPE over the
byte-level ranks in ``qwen.tiktoken`` (151643 ranks), with Qwen's split pattern ``PAT_STR``, NFC
normalisation of the whole text first, and 217 special tokens numbered from ``len(ranks)``:
``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<|extra_0|>`` ..
``<|extra_204|>`` 151646..151850, then ``<ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad>``
151851..151859. Special tokens are recognised anywhere in the text (``allowed_special="all"``), no BOS is
ever added, and eos = pad = ``<|endoftext|>`` (the official evaluation scripts set ``pad_token_id = eod_id``).

``build_qwen_vl_tokenizer`` rebuilds it with transformers' own ``TikTokenConverter`` (its
``load_tiktoken_bpe`` replaced by :func:`read_tiktoken_ranks`, so tiktoken is not needed): a byte-level BPE
with ``ignore_merges`` (a whole pre-token in the vocab is one id, as in tiktoken), the merges ordered by the
rank of their result, the pattern ``PAT_STR`` (``\\p{N}`` single digits, unlike the converter's default
``\\p{N}{1,3}``), an NFC normaliser and the special tokens in the official order. The special tokens are
added with ``normalized=True``, i.e. matched after NFC, because the official normalises the whole text
before it looks for them: ``"<|im_end|>\\u0338"`` becomes ``"<|im_end|\\u226f"`` (``>`` + U+0338 composes to
U+226F), which is no longer a special token, in both. The result is a transformers ``TokenizersBackend``
(``PreTrainedTokenizerFast`` in transformers 5) that ``save_pretrained`` writes as ``tokenizer.json`` and
``AutoTokenizer.from_pretrained(dir)`` loads back with no remote code.

Reproduced: the ids of any text without ``<img>`` (checked id for id against the official tokenizer on
the golden cases in ``tests/golden/qwen_vl/``), ``decode`` (byte-level, invalid UTF-8 replaced by U+FFFD as
the official ``errors="replace"``; ``skip_special_tokens`` drops exactly the 217 special ids, as the
official drops ids >= 151643).

Not reproduced by the tokenizer object itself (by design):

* The official ``<img>PATH</img>`` rewriting. The official ``tokenize`` replaces everything between
  ``<img>`` and ``</img>`` by the raw UTF-8 bytes of the path as ids 0..255 (an id *equal to the byte
  value*, not the byte's token), pads them with ``<imgpad>`` to 256, raises ``ValueError`` on an unclosed
  ``<img>`` or a path of more than 256 bytes, and the model then loads that path from disk. jaxflow feeds
  images as pixels: its prompts hold ``<img>`` + 256 ``<imgpad>`` + ``</img>`` (:data:`IMAGE_PLACEHOLDER`),
  which this tokenizer encodes to exactly ``[151857] + [151859] * 256 + [151858]`` (the model overwrites
  the 256 inner embeddings with the image features either way). The official tokenizer cannot encode that
  string at all: it raises ``TypeError`` because ``<imgpad>`` is a special token inside the span.
  :func:`encode_official` reproduces the rewriting exactly on top of the fast ids, for comparisons with the
  official tokenizer and the official evaluation prompts (``<img>{path}</img>...``).
* The official ``decode`` turns the byte ids of an image span back into the path; here ids 0..255 decode as
  the tokens with those ranks (meaningless inside an image span).
* Subtle BPE tie-breaks: tiktoken merges the leftmost pair among pairs whose concatenations have equal
  rank, the HF BPE uses the merge list order. They can differ only when two different splits of the same
  token are adjacent candidates at once (e.g. ``[ab][a][ba]`` -> ``aba``); no golden case hits this.
* ``to_list_format``/``from_list_format``/``draw_bbox_on_latest_picture`` and the chat helpers (``make_context``
  encodes user content with only the image tags allowed as special, so ``<|im_start|>`` typed by a user is
  plain text there; here it is always special, as in the official ``tokenize``).
"""

from __future__ import annotations

import base64
import binascii
import os

TIKTOKEN_FILE = "qwen.tiktoken"

# tokenization_qwen.py PAT_STR (the same string, split in two lines).
QWEN_VL_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_PAD_TOKEN = "<imgpad>"
# Official order: ref, box, quad tags, then the image tags.
IMAGE_ST = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", IMAGE_START_TOKEN, IMAGE_END_TOKEN,
            IMAGE_PAD_TOKEN)
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS + IMAGE_ST
IMG_TOKEN_SPAN = 256  # official IMG_TOKEN_SPAN: byte ids + <imgpad> between <img> and </img>

# The ids with the real 151643-rank vocabulary (the model config hard-wires image_start_id = 151857).
QWEN_VL_NUM_RANKS = 151643
ENDOFTEXT_ID = 151643
IMAGE_START_ID = 151857
IMAGE_END_ID = 151858
IMAGE_PAD_ID = 151859

# What jaxflow prompts hold for one image (the model fills the 256 inner positions with image features).
IMAGE_PLACEHOLDER = IMAGE_START_TOKEN + IMAGE_PAD_TOKEN * IMG_TOKEN_SPAN + IMAGE_END_TOKEN


def read_tiktoken_ranks(path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (one ``<base64 token> <rank>`` per line; empty lines skipped) as
    {token bytes: rank}. Raises a one-line ValueError naming the file on a malformed line, a repeated
    token or rank, or ranks that are not exactly 0..n-1 (the special-token ids start at n)."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        lines = fh.read().splitlines()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
            if not token or rank < 0:
                raise ValueError
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}: line {lineno} is not '<base64 token> <rank>': "
                             f"{line[:60].decode('latin-1')!r}") from None
        if token in ranks:
            raise ValueError(f"{path}: line {lineno} repeats token {token!r} (rank {ranks[token]})")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: no '<base64 token> <rank>' lines")
    if len(set(ranks.values())) != len(ranks) or max(ranks.values()) != len(ranks) - 1:
        raise ValueError(f"{path}: the ranks are not exactly 0..{len(ranks) - 1} "
                         f"(repeated or missing ranks)")
    return ranks


def _converter_class():
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _QwenVLTikTokenConverter(TikTokenConverter):
        """TikTokenConverter reading the ranks with our reader (no tiktoken needed)."""

        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(tiktoken_url)

    return _QwenVLTikTokenConverter


def build_qwen_vl_tokenizer(vocab_file):
    """The official Qwen-VL tokenizer rebuilt from ``qwen.tiktoken`` as a transformers fast tokenizer.

    eos = pad = ``<|endoftext|>``, no BOS, ``clean_up_tokenization_spaces=False`` (the official decode
    keeps the text as it is), model_max_length 8192 (official tokenizer_config.json). Takes about 3-4 s
    for the real 151643 ranks (most of it is the converter's merge extraction)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab_file = os.fspath(vocab_file)
    converter = _converter_class()(vocab_file, pattern=QWEN_VL_PAT_STR, add_prefix_space=False)
    tok = converter.converted()
    n_ranks = tok.get_vocab_size(with_added_tokens=False)
    tok.normalizer = normalizers.NFC()
    # normalized=True: matched after NFC, as the official finds special tokens in the NFC text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != n_ranks + i:  # e.g. a special token's bytes were a rank in the file
            raise ValueError(f"{vocab_file}: special token {t} got id {tok.token_to_id(t)}, "
                             f"expected {n_ranks + i} (len(ranks) + {i})")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    return fast


def is_qwen_vl_tokenizer_dir(path) -> bool:
    """Whether ``path`` is a directory holding the official Qwen-VL ``qwen.tiktoken``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, TIKTOKEN_FILE))


def load_qwen_vl_tokenizer(path):
    """:func:`build_qwen_vl_tokenizer` from ``path/qwen.tiktoken`` (``path`` may also be the file)."""
    path = os.fspath(path)
    vocab = path if os.path.isfile(path) else os.path.join(path, TIKTOKEN_FILE)
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"{path}: no {TIKTOKEN_FILE} (the official Qwen-VL tokenizer file) there")
    return build_qwen_vl_tokenizer(vocab)


def image_token_ids(tokenizer) -> tuple[int, int, int]:
    """(``<img>``, ``</img>``, ``<imgpad>``) ids of ``tokenizer``."""
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_START_TOKEN, IMAGE_END_TOKEN,
                                                                 IMAGE_PAD_TOKEN))


def _byte_decoder():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def encode_official(tokenizer, text: str) -> list[int]:
    """The ids the official ``QWenTokenizer`` gives for ``text``, image tags included.

    The fast ids, with each ``<img>CONTENT</img>`` span rewritten as the official does: the UTF-8 bytes of
    CONTENT (after NFC) as ids 0..255, padded with ``<imgpad>`` to 256. ValueError on an unclosed ``<img>``
    ("Unclosed image token") or content over 256 bytes, as the official; also ValueError where the
    official fails with TypeError (a special token inside the span, ``<imgpad>`` included). A ``</img>``
    without ``<img>`` stays as it is, as in the official."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    start_id, end_id, pad_id = image_token_ids(tokenizer)
    if start_id not in ids:
        return ids
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    byte_of = _byte_decoder()
    out: list[int] = []
    end = 0
    while True:
        try:
            start = ids.index(start_id, end)
        except ValueError:
            break
        out.extend(ids[end:start])
        try:
            end = ids.index(end_id, start)
        except ValueError:
            raise ValueError("Unclosed image token") from None
        content = ids[start + 1:end]
        bad = [tokenizer.convert_ids_to_tokens(i) for i in content if i in special]
        if bad:
            raise ValueError(f"special token {bad[0]} inside {IMAGE_START_TOKEN}..{IMAGE_END_TOKEN} "
                             f"(the official tokenizer fails there with TypeError)")
        raw = bytes(byte_of[c] for tok in tokenizer.convert_ids_to_tokens(content) for c in tok)
        if len(raw) > IMG_TOKEN_SPAN:
            raise ValueError(f"The content in {IMAGE_START_TOKEN}..{IMAGE_END_TOKEN} is too long")
        out.append(start_id)
        out.extend(raw)
        out.extend([pad_id] * (IMG_TOKEN_SPAN - len(raw)))
        out.append(end_id)
        end += 1
    out.extend(ids[end:])
    return out
