"""``nltk.word_tokenize`` without nltk and without its downloaded data (CHAIR's "llava" protocol).

The reference CHAIR code (LisaAnne/Hallucination ``utils/chair.py``) tokenises a caption with
``nltk.word_tokenize(caption.lower())``. That function does two things:

1. **Sentence splitting** with the Punkt sentence tokenizer (``sent_tokenize``), whose English
   parameters are a trained model that nltk downloads (``punkt`` / ``punkt_tab``). We cannot
   download it; ``split_sentences`` runs the Punkt *algorithm* (candidate sentence ends, its
   word tokens, first and second annotation pass, boundary realignment) with fixed parameters
   in place of the trained ones (see below). Splitting matters because the word tokenizer only
   detaches the *final* period of its input: ``"a dog. a cat."`` is split into two sentences
   and tokenises to ``a dog . a cat .``; tokenised as one string it would give ``dog.`` (no
   object) as a token.
2. **Word tokenization** of each sentence with nltk's ``NLTKWordTokenizer`` (an improved Penn
   Treebank tokenizer; it needs no data). ``treebank_tokenize`` applies the same ordered regex
   rules, as nltk 3.6.6-3.8.x has them (the versions LVLM papers ran): quotes, punctuation
   (``, ; : @ # $ % & ? ! * ( ) [ ] { } < >``, ``--``, ``...``), the final period, clitics
   (``'s 'm 'd 'll 're 've n't``) and a few contractions (``cannot`` -> ``can not``). Notably
   ``/`` and ``-`` inside a word are *not* split: ``"tv/monitor"`` and ``"t-shirt"`` are one
   token each; a period inside a sentence stays on its word (``"st."``, ``"3.5"``).

   Later nltk releases (3.10 has them) changed a few rules that captions rarely meet: en/em
   dashes (``–``, ``—``) become tokens, runs of white space are normalised before the clitic
   rules, and a single quote opening a word (``'quote``) is split off. We follow 3.8.

**Where sentence splitting is approximate.** Punkt decides whether a period followed by white
space ends a sentence from the word before it. Rules, on lower-cased text (as CHAIR has it):

- ``?`` and ``!`` followed by white space (or by one of ``) " ; } ] * : @ ' ( { [ ! ?``) end a
  sentence (the tokenizer splits them off in any case).
- A word ending in ``.`` (``"dog."``) ends a sentence, unless it is
  (a) an ellipsis (``"..."``): never;
  (b) an abbreviation: never (with lower-case text the trained model's "sentence starter"
  evidence, which needs a capitalised next word, cannot fire). Punkt's English model has a
  learned list of some 150 abbreviations; we use ``ABBREVIATIONS`` (titles, Latin
  abbreviations, company suffixes, months, ``a.m``/``p.m``, ...), a subset of it as far as we
  know. **This is the approximation**: a caption with ``"<word>. "`` where ``<word>`` is in
  the trained list but not in ours (or the other way round) is split differently, and the
  period stays on (or comes off) ``<word>``;
  (c) a single letter (``"a."``) or a number (``"2."``, ``"3.5."``) followed by a lower-case
  word or by one of ``; : , . ! ?``: no break (for a single letter also before a capitalised
  word). The trained model looks the next word up in its orthographic statistics; a word it
  has only seen lower-case, and lower-case at a sentence start, would break there. We assume
  the common case (no break);
  (d) a pair the trained model knows as a collocation (e.g. a number and a month): we know no
  collocations, so these break.

Everything else (the candidate contexts, which text goes to which sentence, closing brackets
and quotes after the period moving to the earlier sentence) follows Punkt exactly: with
``abbreviations=()`` ``split_sentences`` gives the output of an untrained
``nltk.tokenize.PunktSentenceTokenizer()``.

Examples (lower-cased input)::

    word_tokenize("a dog. hot. dogs on a tv/monitor!")
    -> ['a', 'dog', '.', 'hot', '.', 'dogs', 'on', 'a', 'tv/monitor', '!']
    word_tokenize("the dog's bone, a man's hat")
    -> ['the', 'dog', "'s", 'bone', ',', 'a', 'man', "'s", 'hat']
    word_tokenize("a sign for st. louis. a bus")   # "st" is an abbreviation: no break after it
    -> ['a', 'sign', 'for', 'st.', 'louis', '.', 'a', 'bus']
"""
from __future__ import annotations

import re

# --------------------------------------------------------------------------- Punkt (sentences)

# Abbreviations (without their final period, lower case) after which a period does not end a
# sentence. A subset of the learned list of Punkt's English model (see the module docstring).
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "rev", "gen", "col", "lt", "sgt", "capt", "gov", "sen",
    "rep", "vs", "etc", "e.g", "i.e", "cf", "inc", "co", "corp", "ltd", "bros", "u.s", "u.k", "u.n", "a.m", "p.m",
    "jan", "feb", "aug", "sept", "oct", "nov", "dec", "mt", "ft", "ave", "blvd",
})

# Punkt's sentence-end characters and the characters that cannot be part of a word.
_END = frozenset(".?!")
_NON_WORD = r"""[)";}\]*:@'({\[!?]"""
_MULTI = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_WORD_START = r"""[^("`{\[:;&#*@)}\]\-,]"""
# A potential sentence end: an end character followed by non-word punctuation or by white space
# and a next token.
_CANDIDATE = re.compile(rf"[.?!](?=(?P<after>{_NON_WORD}|\s+(?P<next>\S+)))")
# Punkt's word tokens (used only to judge a candidate's context): a multi-character punctuation
# run, a word up to white space / non-word punctuation / a multi-character run / a word-final
# comma, or any other single character.
_PUNKT_WORD = re.compile(
    rf"""{_MULTI}
    |(?={_WORD_START})\S+?(?=\s|$|{_NON_WORD}|{_MULTI}|,(?=$|\s|{_NON_WORD}|{_MULTI}))
    |\S""", re.VERBOSE)
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_ELLIPSIS = re.compile(r"\.\.+$")
_ORTHO_PUNCT = frozenset(";:,.!?")
_LAST_SPACE = re.compile(r".*\s", re.DOTALL)
# Closing punctuation right after a sentence end belongs to that sentence.
_REALIGN = re.compile(r"""["')\]}]+?(?:\s+|(?=--)|$)""", re.MULTILINE)


def _ends_sentence(tok: str, nxt: str | None, abbreviations) -> bool:
    """Punkt's decision for one word token (first and second annotation pass)."""
    if tok in _END:  # a lone "." / "?" / "!"
        return True
    if not tok.endswith(".") or _ELLIPSIS.match(tok) or tok.endswith(".."):
        return False
    stem = tok[:-1].lower()
    if stem in abbreviations or stem.split("-")[-1] in abbreviations:
        return False  # an abbreviation: no orthographic evidence can make it a break in lower-case text
    kind = _NUMBER.sub("##number##", tok.lower())
    if kind.endswith(".") and len(kind) > 1:
        kind = kind[:-1]
    initial = bool(_INITIAL.match(tok))
    if initial or kind == "##number##":
        # the orthographic heuristic with no statistics: "not a sentence starter" for punctuation
        # and lower-case words, "unknown" otherwise
        if nxt in _ORTHO_PUNCT or nxt[0].islower():
            return False
        if initial and nxt[0].isupper():
            return False
    return True


def _context_breaks(context: str, abbreviations) -> bool:
    """True when a Punkt word token of ``context`` ends a sentence and another token follows it."""
    toks = _PUNKT_WORD.findall(context)
    for i, tok in enumerate(toks[:-1]):
        if _ends_sentence(tok, toks[i + 1], abbreviations):
            return True
    return False


def split_sentences(text: str, abbreviations=ABBREVIATIONS) -> list[str]:
    """Punkt's sentence split of ``text`` with fixed parameters (see the module docstring)."""
    spans: list[tuple[int, int]] = []
    last_break = 0
    # candidates whose word runs into the next candidate (e.g. "!!!") count once, at the last one
    cands: list[tuple[re.Match, int]] = []  # (match, start of the word before it)
    prev_stop, prev_start = 0, 0
    for m in _CANDIDATE.finditer(text):
        last_ws = _LAST_SPACE.match(text, prev_stop, m.start())
        ws = last_ws.end() - 1 - prev_stop if last_ws else 0  # index of the last white space, 0 if none
        start = prev_stop + ws + 1 if ws else prev_start
        if cands and cands[-1][0].start() > start:
            cands.pop()
        cands.append((m, start))
        prev_stop, prev_start = m.start(), start
    for m, start in cands:
        context = text[start:m.start()] + m.group() + m.group("after")
        if _context_breaks(context, abbreviations):
            spans.append((last_break, m.end()))
            last_break = m.start("next") if m.group("next") else m.end()
    spans.append((last_break, len(text.rstrip())))
    # realign: closing quotes / brackets that open the next sentence join the earlier one
    out: list[str] = []
    shift = 0
    for i, (s, e) in enumerate(spans):
        s += shift
        if i + 1 == len(spans):
            if text[s:e]:
                out.append(text[s:e])
            break
        ns, ne = spans[i + 1]
        m = _REALIGN.match(text[ns:ne])
        if m:
            out.append(text[s:ns + len(m.group(0).rstrip())])
            shift = m.end()
        else:
            shift = 0
            if text[s:e]:
                out.append(text[s:e])
    return out


# --------------------------------------------------------------------------- Treebank (words)

def _rules(*rules):
    """Compiled rules: (pattern, replacement, triggers) — a rule is skipped when none of its trigger
    strings occurs in the text (each is a necessary condition for a match, so this only saves time)."""
    return tuple((re.compile(p), r, tuple(t)) for p, r, t in rules)


# Applied in this order to one sentence (NLTKWordTokenizer, nltk 3.6.6-3.8.x).
_OPENING_QUOTES = _rules(
    ("([«“‘„]|[`]+)", r" \1 ", "«“‘„`"),              # typographic opening quotes, backticks
    (r'^"', r"``", '"'),                                 # a straight double quote starting the sentence
    (r"(``)", r" \1 ", ["``"]),
    (r"""([ (\[{<])("|'{2})""", r"\1 `` ", "\"'"),      # a double quote after a space or an opening bracket
    (r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2", "'"),  # a single quote opening a word
)
_PUNCTUATION = _rules(
    (r"""([^.])(\.)([\]\)}>"'»”’ ]*)\s*$""", r"\1 \2 \3 ", "."),  # the final period (and closers after it)
    (r"([:,])([^\d])", r" \1 \2", ":,"),            # comma / colon, not inside a number ("3,000")
    (r"([:,])$", r" \1 ", ":,"),
    (r"\.{2,}", r" \g<0> ", [".."]),                 # ellipses
    (r"[;@#$%&]", r" \g<0> ", ";@#$%&"),
    (r"""([^.])(\.)([\]\)}>"']*)\s*$""", r"\1 \2\3 ", "."),
    (r"[?!]", r" \g<0> ", "?!"),
    (r"([^'])' ", r"\1 ' ", ["' "]),                 # a closing single quote
    (r"[*]", r" \g<0> ", "*"),
)
_BRACKETS = _rules((r"[\]\[(){}<>]", r" \g<0> ", "[](){}<>"), (r"--", r" -- ", ["--"]))
_CLOSING_QUOTES = _rules(
    ("([»”’])", r" \1 ", "»”’"),
    (r"''", " '' ", ["''"]),
    (r'"', " '' ", '"'),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 ", "'"),               # clitics 's 'm 'd, possessive '
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 ", "'"),   # clitics 'll 're 've n't
)
# case-insensitive: triggers are looked for in the lower-cased text
_CONTRACTIONS = _rules(*[(p, r" \1 \2 ", [t]) for p, t in (
    (r"(?i)\b(can)(not)\b", "cannot"), (r"(?i)\b(d)('ye)\b", "d'ye"), (r"(?i)\b(gim)(me)\b", "gimme"),
    (r"(?i)\b(gon)(na)\b", "gonna"), (r"(?i)\b(got)(ta)\b", "gotta"), (r"(?i)\b(lem)(me)\b", "lemme"),
    (r"(?i)\b(more)('n)\b", "more'n"), (r"(?i)\b(wan)(na)(?=\s)", "wanna"), (r"(?i) ('t)(is)\b", "'tis"),
    (r"(?i) ('t)(was)\b", "'twas"),
)])


def treebank_tokenize(sentence: str) -> list[str]:
    """The word tokens of one sentence (nltk's ``NLTKWordTokenizer().tokenize``)."""
    text = sentence
    for rules in (_OPENING_QUOTES, _PUNCTUATION, _BRACKETS, _CLOSING_QUOTES):
        if rules is _CLOSING_QUOTES:
            text = f" {text} "
        for rx, rep, triggers in rules:
            if any(t in text for t in triggers):
                text = rx.sub(rep, text)
    low = text.lower()
    for rx, rep, triggers in _CONTRACTIONS:
        if triggers[0] in low:
            text = rx.sub(rep, text)
            low = text.lower()
    return text.split()


def word_tokenize(text: str, abbreviations=ABBREVIATIONS) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences (approximated, see the module docstring), each
    tokenised by the Treebank rules."""
    return [tok for sent in split_sentences(text, abbreviations) for tok in treebank_tokenize(sent)]
