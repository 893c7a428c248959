"""A tiny deterministic word-level tokenizer for tests and toy models (no downloads).

Special tokens: ``<unk>``=0, ``<s>``=1 (BOS, prepended by the post-processor),
``</s>``=2, ``<pad>``=3, ``<image>``=4 (an added special token, so ``"<image>"`` in
text is always one id). Then a fixed, case-sensitive English word list, then
``<extra_i>`` fillers up to exactly ``TINY_VOCAB_SIZE`` ids. Text is split on
whitespace and punctuation (each punctuation mark and each digit is its own token);
unknown words map to ``<unk>``; decoding joins tokens with single spaces.
"""

from __future__ import annotations

TINY_VOCAB_SIZE = 512
TINY_UNK = 0
TINY_BOS = 1
TINY_EOS = 2
TINY_PAD = 3
TINY_IMAGE_TOKEN_ID = 4

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

_PUNCTUATION = list(".,:;?!'\"()[]{}-_/\\<>=+*&%$#@^~`|")
_DIGITS = list("0123456789")
_LETTERS = list("ABCDEFGH")

# Order matters: ids are assigned in this order after the special tokens.
_WORDS = """
A chat between a curious user and an artificial intelligence assistant The gives helpful
detailed polite answers to the user s questions USER ASSISTANT
what What is Is are Are there There this This that That these those the a an
image Image picture photo describe Describe answer Answer question Question using single
word or phrase Please please detail in on of with without from at by for as it its
yes Yes no No not n t do does did Do Does Did can could would should will be been
how How many Many much which Which who Who where Where when When why Why
color colour colors red green blue yellow orange purple pink brown black white gray grey
shape shapes circle square triangle rectangle star line lines dot dots box ball
one two three four five six seven eight nine ten zero number numbers count
left right top bottom middle center centre above below under over next near far behind
front inside outside big small large tiny little long short tall round flat
person people man woman boy girl child dog cat bird horse car bus truck train bike
boat plane tree trees sky sun cloud water grass road street house building room table
chair bed cup bottle book phone sign text letter letters written says say read
context Context option options choice choices given directly Reference OCR token tokens
has have had shows show showing shown see seen look looks appear appears visible
background foreground object objects thing things scene area part side edge corner
all some any each every other another more most less few both only also very
and but so if then than because while however
I you he she we they me him her us them my your his our their
here now again still just like same different
textured soft bright dark light
""".split()

# Words the demo prompts and tests rely on (checked at build time).
REQUIRED_WORDS = (
    "USER", "ASSISTANT", ":", "yes", "no", "red", "green", "blue", "circle", "square",
    "triangle", "what", "is", "there", "a", "the", "image", "describe", "answer",
    "question", "using", "single", "word", "or", "phrase",
)


def tiny_vocab() -> dict[str, int]:
    """The full token -> id map (exactly ``TINY_VOCAB_SIZE`` entries)."""
    tokens: list[str] = list(SPECIAL_TOKENS)
    seen = set(tokens)
    for tok in _PUNCTUATION + _DIGITS + _LETTERS + _WORDS:
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    if len(tokens) > TINY_VOCAB_SIZE:
        raise AssertionError(f"tiny vocab has {len(tokens)} > {TINY_VOCAB_SIZE} tokens")
    i = 0
    while len(tokens) < TINY_VOCAB_SIZE:
        tokens.append(f"<extra_{i}>")
        i += 1
    return {tok: idx for idx, tok in enumerate(tokens)}


def build_tiny_tokenizer():
    """Build the tiny word-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Deterministic and offline; ``save_pretrained`` + ``AutoTokenizer.from_pretrained``
    round-trips to identical ids.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from jaxflow.data.prompts import VICUNA_V1_SYSTEM

    vocab = tiny_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    # WordPiece decoding with an unused prefix and no cleanup = join with spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", TINY_BOS)],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    # Sanity: ids of specials and coverage of the words the prompts use.
    ids = fast.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != [TINY_UNK, TINY_BOS, TINY_EOS, TINY_PAD, TINY_IMAGE_TOKEN_ID]:
        raise AssertionError(f"special token ids are {ids}")
    if len(fast) != TINY_VOCAB_SIZE:
        raise AssertionError(f"len(tokenizer) = {len(fast)} != {TINY_VOCAB_SIZE}")
    missing = [w for w in REQUIRED_WORDS if w not in vocab]
    missing += [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(VICUNA_V1_SYSTEM) if w not in vocab]
    if missing:
        raise AssertionError(f"tiny vocab lacks {missing}")
    return fast
