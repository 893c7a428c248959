#!/usr/bin/env python
"""Write tokenizer_cases.json: 200 strings and the ids the OFFICIAL Qwen-VL tokenizer gives them.

The official tokenizer is ``QWenTokenizer`` from ``<refs>/remote/tokenization_qwen.py`` (the unmodified
Qwen-VL remote code), imported by file path as a plain module (no trust_remote_code, nothing copied, no
bytecode written) and built from ``<refs>/remote/qwen.tiktoken``. It needs tiktoken, and the module also
imports torch, matplotlib, PIL and requests at import time. Nothing is downloaded.

    python tests/golden/qwen_vl/make_golden_tokenizer.py [--refs DIR] [--out FILE]

Output: {"source", "vocab_sha256", "n_ranks", "cases": [{"text", "ids", "image", "decoded",
"decoded_skip_special"}...], "error_cases": [{"text", "official_error"}...]}. ``ids`` are
``convert_tokens_to_ids(tokenize(text))``, which is also what ``encode`` and ``__call__`` give (no BOS is ever
added); ``image`` says whether the text has an ``<img>...</img>`` span (whose content the official turns
into byte ids padded with ``<imgpad>``); ``decoded``/``decoded_skip_special`` are the official decode of
``ids`` (null for image cases: the official decode re-encodes the path there). ``error_cases`` are texts
the official tokenizer refuses, with the exception class and message.

The strings are a fixed list plus combinations drawn with ``random.Random(SEED)``, so the file is the same
on every run (tests/test_qwen_vl_tokenizer.py regenerates it and compares when the refs are there).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_REFS = os.path.join(REPO, "..", "shared", "refs", "qwen_vl_v1")
DEFAULT_OUT = os.path.join(HERE, "tokenizer_cases.json")
N_CASES = 200
SEED = 20230822  # Qwen-VL's first public commit date

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

FIXED = [
    # English prose
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "A man is riding a horse on a beach at sunset, while two dogs run beside him.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong was the first to step onto its surface.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She said, \"It's fine,\" and left -- without another word...",
    # POPE / TextVQA / ScienceQA / COCO captions / Qwen-VL eval prompt styles
    "Is there a dog in the image?",
    "Is there a traffic light in the image? Please answer yes or no.",
    "Is there a dining table in the image? Answer the question using a single word or phrase.",
    "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera\n"
    "Answer the question using a single word or phrase.",
    "what number is on the bus? Answer:",
    "What does the small white text spell? Answer: copenhagen",
    "Context: The diagrams below show two pure samples of gas in identical closed, rigid containers.\n"
    "Question: Compare the average kinetic energies of the particles in each sample. Which sample has "
    "the higher temperature?\nOptions: A. neither; the samples have the same temperature\nB. sample A\n"
    "C. sample B\nAnswer:",
    "Context: N/A\nQuestion: Which of these states is farthest north?\nOptions: A. West Virginia\n"
    "B. Louisiana\nC. Arizona\nD. Oklahoma\nAnswer:",
    " A",
    " B",
    "Describe the image in English:",
    "Describe the image in English: A group of people standing around a kitchen preparing food.",
    "Generate the caption in English:",
    "Please describe this image in detail.",
    "A close up of a plate of food with broccoli and rice.",
    "USER: What is shown in this image? ASSISTANT: A red double-decker bus.",
    # Chinese, Japanese, Korean, other scripts
    "你好，世界！",
    "图中是一名年轻女子在沙滩上和她的狗玩耍，狗的品种可能是拉布拉多。",
    "输出\"狗\"的检测框",
    "这是什么？请用一句话回答。",
    "東京は日本の首都です。ひらがな、カタカナ、漢字。",
    "ｶﾀｶﾅ　全角スペース　ＡＢＣ１２３",
    "안녕하세요, 세계! 한국어 문장입니다.",
    "Привет, мир! Это тест.",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Tiếng Việt có dấu: Đường phố Hà Nội",
    # emoji (ZWJ sequences, flags, skin tones, variation selectors)
    "I love it 😀😃😄 !!!",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs",
    "🇨🇳🇺🇸🇯🇵 ❤️ ☺︎",
    # combining characters that NFC changes, and compatibility characters
    "cafe\u0301 vs caf\u00e9",
    "A\u030angstro\u0308m and \u212b and \u2126",
    "\u1100\u1161\u11a8 (Hangul jamo) vs \uac01",
    "n\u0303o\u0308\u0301 e\u0323\u0302 \u0041\u0328\u0301",
    "\uf900\uf901 CJK compatibility",
    "\ufb01 ligature, \u2460 circled, x\u00b2",
    "a\u0338 =\u0338 <\u0338 >\u0338",
    # digits and long numbers
    "0",
    "1234567890",
    "3.14159265358979323846264338327950288419716939937510",
    "Call 555-0123 or +1 (800) 123-4567 by 2024-01-31 12:34:56.",
    "$1,000,000.00 and 99.9% and 1e-10 and 0x1F",
    "١٢٣ ٤٥٦ and ０１２ and ⅫⅣ",
    # code
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\nprint(x.shape)",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "<div class=\"box\"><span>hi</span></div>",
    "{\"key\": [1, 2, {\"nested\": null}], \"ok\": true}",
    "if __name__ == '__main__':\n\tmain()\r\n",
    # URLs, paths, emails
    "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg",
    "http://example.com/a/b?c=1&d=%20e#frag",
    "see /usr/local/lib/python3.11/site-packages and C:\\Users\\me\\file.txt",
    "mail me: someone@example.org",
    # whitespace
    "",
    " ",
    "  ",
    "a    b",
    "   leading spaces",
    "trailing spaces   ",
    "\ttab\tseparated\tvalues\t",
    "\t\t\tindented",
    "line one\nline two\n\nline four\n",
    "windows\r\nline\r\nendings\r\n",
    "\r\n\r\n",
    "\n\n\n",
    " \n \n ",
    "mixed \t \n \r\n  end",
    "no\u00a0break\u3000ideographic\u2003em space",
    "\u200bzero\u200cwidth\u200d joiners",
    # contractions in upper and lower case
    "DON'T STOP, it's fine, I'M here, we'll see, they've gone, you'd know, I'm sure",
    "It'S, It'LL, WE'RE, They'Ve, She'D",
    "don't won't can't shouldn't",
    "it’s a curly apostrophe’s case",
    "'s 't 're 've 'm 'll 'd",
    # punctuation runs
    "Wait!!! What??? Really?!?!",
    "Hmm... ... ....",
    "----- ===== ***** _____",
    "(((nested))) [[[brackets]]] {{{braces}}}",
    "«quotes» „Anführungszeichen“ 「かぎかっこ」",
    "a.b,c;d:e!f?g",
    # special tokens inline, every kind
    "<|endoftext|>",
    "Hello<|endoftext|>World",
    SYSTEM + "<|im_start|>user\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>assistant\nA cat.<|im_end|><|endoftext|>",
    "<|extra_0|><|extra_5|> text <|extra_204|>",
    "<|extra_205|> is not a special token, nor is <|extra_-1|> or <|im_middle|>",
    "<ref>the dog</ref><box>(1,2),(3,4)</box>",
    "<ref>a woman</ref><box>(451,379),(731,806)</box> and <ref>a dog</ref><box>(219,424),(576,896)</box>",
    "<quad>(1,2),(3,4),(5,6),(7,8)</quad>",
    "</img> closing tag alone, and <imgpad> alone",
    "<IMG>not special</IMG> <img >also not</img > < img>",
    "<|endoftext|>\u0338 (NFC turns >\u0338 into \u226f)",
    "<|im_end|>\u0338",
    "<ref>\u0338</ref>",
    "<|endoftext|><|endoftext|><|endoftext|>",
    "x<|im_start|>y<|im_end|>z",
    # image tags: the official turns the path into byte ids padded with <imgpad> to 256
    "<img>/path/to/a.jpg</img>",
    "<img>/path/to/a.jpg</img>What is the brand of this camera? Answer:",
    "<img>data/coco/val2014/COCO_val2014_000000000042.jpg</img>Describe the image in English:",
    "<img>data/textvqa/train_images/003a8ae2ef43b901.jpg</img>what is the brand of this camera? Answer:",
    "<img>data/scienceqa/images/test/1/image.png</img>Context: N/A\nQuestion: Which animal's feet are "
    "also adapted for sticking to smooth surfaces?\nOptions: A. tiger\nB. Madagascar day gecko\nAnswer:",
    "<img>val2014/COCO_val2014_000000310196.jpg</img>Is there a snowboard in the image?",
    "Picture 1:<img>https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg</img>\n这是什么",
    "Picture 1:<img>a.png</img>\nPicture 2:<img>b.png</img>\nWhat differs?",
    "<img></img>empty path",
    "<img>/tmp/cafe\u0301 \u753b\u50cf.jpg</img> NFC and non-ASCII path",
    "<img>" + "x" * 256 + "</img>exactly 256 bytes",
    "<img>" + "\u00e9" * 128 + "</img>256 bytes of two-byte characters",
    "<img>a b  c\td\ne</img>",
    "stray </img> then <img>ok.jpg</img> then </img>",
    SYSTEM + "<|im_start|>user\nPicture 1:<img>assets/demo.jpeg</img>\n这是什么<|im_end|>\n<|im_start|>assistant\n",
]

ERRORS = [
    "<img>/path/without/end.jpg",
    "<img>" + "y" * 257 + "</img>",
    "<img>" + "\u00e9" * 129 + "</img>",
    "<img><imgpad></img>",
    "<img>a<|endoftext|>b</img>",
    "<img>" + "<imgpad>" * 256 + "</img>",
    "<img>a.jpg</img><img>b.jpg",
]

# Pools for the seeded random combinations.
WORDS = ["the", "The", "image", "picture", "shows", "a", "red", "bus", "dog", "cat", "Is", "there", "What",
         "color", "is", "it", "number", "written", "sign", "yes", "no", "Yes", "No", "Answer:", "Question:",
         "Options:", "Context:", "A.", "B.", "C.", "D.", "caption", "English", "Describe", "left", "right"]
SCRIPTS = ["猫", "一只狗", "图片", "这是", "東京", "ねこ", "カメラ", "사진", "고양이", "кошка", "γάτα", "قطة",
           "😀", "🐶", "👍🏽", "❤️", "🇯🇵", "e\u0301", "A\u030a", "\u1100\u1161", "\u2126", "\ufb01"]
NUMBERS = ["0", "7", "42", "2023", "3.14", "1,024", "99%", "12345678901234", "-5", "1e9", "(1,2),(3,4)"]
PUNCT = [".", ",", "!", "?", "...", "!!!", "?!", ":", ";", "--", "()", "[]", "\"", "'", "'s", "'T", "'LL",
         "’s", "#", "@", "&", "/", "\\", "<", ">", "<>", "|", "||", "=>", "->", "**"]
SPACES = [" ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", " \n", "\u00a0", "\u3000"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_1|>", "<|extra_42|>", "<|extra_204|>",
            "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<imgpad>"]
IMAGES = ["<img>a.jpg</img>", "<img>/data/coco/val2014/COCO_val2014_000000000139.jpg</img>",
          "<img>https://example.com/x.png</img>", "<img></img>", "<img>图片.png</img>"]
SEPARATORS = ["", "", " ", " ", "  ", "\n", "\t", "\r\n"]


def random_cases(n: int, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    pools = [(WORDS, 6), (SCRIPTS, 3), (NUMBERS, 2), (PUNCT, 3), (SPACES, 2), (SPECIALS, 1), (IMAGES, 1)]
    population = [p for p, w in pools for _ in range(w)]
    out: list[str] = []
    seen = set(FIXED)
    while len(out) < n:
        parts = [rng.choice(rng.choice(population)) for _ in range(rng.randint(2, 10))]
        if rng.random() < 0.5:
            parts = [p.upper() if rng.random() < 0.3 else p for p in parts]
        text = "".join(p + rng.choice(SEPARATORS) for p in parts)
        if rng.random() < 0.25:
            text = rng.choice(SPACES) + text
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def all_texts() -> list[str]:
    assert len(set(FIXED)) == len(FIXED), "duplicate fixed cases"
    return FIXED + random_cases(N_CASES - len(FIXED))


def load_official(refs: str):
    """QWenTokenizer from refs/remote, imported by file path (no remote-code machinery)."""
    remote = os.path.join(refs, "remote")
    name = "qwenvl_official_tokenization"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(remote, "tokenization_qwen.py"))
        mod = importlib.util.module_from_spec(spec)
        dont = sys.dont_write_bytecode
        sys.dont_write_bytecode = True
        try:
            spec.loader.exec_module(mod)
        finally:
            sys.dont_write_bytecode = dont
        sys.modules[name] = mod
    return mod.QWenTokenizer(os.path.join(remote, "qwen.tiktoken"))


def make_cases(refs: str) -> dict:
    tok = load_official(refs)
    vocab = os.path.join(refs, "remote", "qwen.tiktoken")
    with open(vocab, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    cases = []
    for text in all_texts():
        ids = [int(i) for i in tok.convert_tokens_to_ids(tok.tokenize(text))]
        assert list(tok.encode(text)) == ids, text
        image = tok.img_start_id in ids
        cases.append({
            "text": text,
            "ids": ids,
            "image": image,
            "decoded": None if image else tok.decode(ids),
            "decoded_skip_special": None if image else tok.decode(ids, skip_special_tokens=True),
        })
    errors = []
    for text in ERRORS:
        try:
            tok.tokenize(text)
        except Exception as e:  # noqa: BLE001 -- recording what the official raises
            errors.append({"text": text, "official_error": f"{type(e).__name__}: {e}"})
        else:
            raise AssertionError(f"the official tokenizer accepted {text!r}")
    return {
        "source": "QWenTokenizer from tokenization_qwen.py (Qwen-VL remote code, "
                  "github.com/x1ngzai/Qwen-VL-Chat-Int4 @ 1cd721a27dd000fc4cf688c6ad58e614da1d600d), "
                  "written by tests/golden/qwen_vl/make_golden_tokenizer.py",
        "vocab_sha256": sha,
        "n_ranks": len(tok.mergeable_ranks),
        "cases": cases,
        "error_cases": errors,
    }


def dumps(data: dict) -> str:
    """JSON with one case per line (ASCII only, so no editor or tool can normalise the test strings)."""
    head = {k: v for k, v in data.items() if k not in ("cases", "error_cases")}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    for key in ("cases", "error_cases"):
        rows = [f"  {json.dumps(c, ensure_ascii=True)}" for c in data[key]]
        lines.append(f" {json.dumps(key)}: [\n" + ",\n".join(rows) + "\n ]" + ("," if key == "cases" else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refs", default=DEFAULT_REFS, help="the qwen_vl_v1 refs folder (holds remote/)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="the JSON file to write")
    args = ap.parse_args(argv)
    data = make_cases(args.refs)
    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(dumps(data))
    n_img = sum(c["image"] for c in data["cases"])
    print(f"wrote {args.out}: {len(data['cases'])} cases ({n_img} with images), "
          f"{len(data['error_cases'])} error cases, vocab sha256 {data['vocab_sha256'][:16]}")


if __name__ == "__main__":
    main()
