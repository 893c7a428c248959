"""Prompt templates, batch tokenisation with image-token expansion, and token groups.

Token groups (docs/analysis.md), always computed from the ids:
S = real tokens before the first image token, T = the image-token block,
U = real tokens after the image block that are not answer tokens, A = answer tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES = ("vicuna_v1", "llava_hf", "internvl", "qwen2_vl", "qwen_vl")
QWEN2_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in a Qwen2-VL prompt
QWEN2_VL_SYSTEM = "You are a helpful assistant."
INTERNVL_IMAGE_START, INTERNVL_IMAGE_END = "<img>", "</img>"
# text that marks an image in each template's prompts besides the placeholder itself (a question may not hold it)
IMAGE_MARKERS = {"vicuna_v1": ("<image>",), "llava_hf": ("<image>",), "internvl": ("<img>", "</img>"),
                 "qwen2_vl": ("<|vision_start|>", "<|vision_end|>"), "qwen_vl": ("<img>", "</img>")}


def format_prompt(question: str, template: str = "vicuna_v1", image_token: str = "<image>", *,
                  tokenizer=None) -> str:
    """Format one single-image question as a generation prompt.

    ``vicuna_v1`` (original LLaVA-1.5 eval): ``"{system} USER: <image>\\n{question} ASSISTANT:"``;
    ``llava_hf`` (llava-hf chat template, no system prompt): ``"USER: <image>\\n{question} ASSISTANT:"``;
    ``internvl``: the chat template of the checkpoint's own tokenizer (``tokenizer.chat_template``,
    an image then the question in one user turn, generation prompt added), or without one ChatML
    ``"<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"``; the image
    placeholder (``image_token``, the context token) is wrapped in ``<img>``/``</img>`` as
    transformers' InternVL processor does before expanding it;
    ``qwen2_vl``: the checkpoint tokenizer's chat template, which renders the image as
    ``<|vision_start|><|image_pad|><|vision_end|>`` (``image_token`` is the pad token the processor
    expands), or without one Qwen2-VL's ChatML with its default system prompt;
    ``qwen_vl``: the official Qwen-VL evaluation's base-model format
    ``"<img>{image}</img>{question} Answer:"`` (``image_token`` is ``<imgpad>``, expanded to the
    resampler's 256 queries; a question ending in ":" gets no " Answer:", see ``qwen_vl_prompt``).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid templates: {', '.join(TEMPLATES)}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty")
    for marker in (image_token,) + IMAGE_MARKERS.get(template, ()):
        if marker and marker in question:
            raise ValueError(f"the question contains {marker!r}, the model's image placeholder; the prompt template "
                             "places the image itself: remove it from the question")
    if template == "internvl":
        return _internvl_prompt(question, image_token, tokenizer)
    if template == "qwen2_vl":
        return _qwen2_vl_prompt(question, image_token, tokenizer)
    if template == "qwen_vl":
        return qwen_vl_prompt(question, image_token)
    body = f"USER: {image_token}\n{question} ASSISTANT:"
    if template == "vicuna_v1":
        return f"{VICUNA_V1_SYSTEM} {body}"
    return body


def qwen_vl_prompt(question: str, image_token: str = "<imgpad>") -> str:
    """Qwen-VL (v1), its official evaluation's base-model format: the image span, then the question,
    then " Answer:" (its VQA format); a question that already ends in ":" (ScienceQA's
    "...\nAnswer:", the caption instruction "Describe the image in English:") is used as it is."""
    tail = "" if question.rstrip().endswith(":") else " Answer:"
    return f"<img>{image_token}</img>{question}{tail}"


def _qwen2_vl_prompt(question: str, image_token: str, tokenizer) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    else:
        text = (f"<|im_start|>system\n{QWEN2_VL_SYSTEM}<|im_end|>\n<|im_start|>user\n{QWEN2_VL_IMAGE}{question}"
                "<|im_end|>\n<|im_start|>assistant\n")
    if text.count(image_token) != 1:
        raise ValueError(f"the Qwen2-VL prompt renders {text.count(image_token)} image placeholders "
                         f"({image_token!r}) for one image")
    return text


def _internvl_prompt(question: str, image_token: str, tokenizer) -> str:
    text = None
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if image_token not in text and "<image>" in text:
            text = text.replace("<image>", image_token, 1)
        if text.count(image_token) != 1:
            raise ValueError(f"the tokenizer's chat template renders {text.count(image_token)} image placeholders "
                             f"({image_token!r}) for one image")
    if text is None:
        text = f"<|im_start|>user\n{image_token}\n{question}<|im_end|>\n<|im_start|>assistant\n"
    start = getattr(tokenizer, "start_image_token", None) or INTERNVL_IMAGE_START
    end = getattr(tokenizer, "end_image_token", None) or INTERNVL_IMAGE_END
    return text.replace(image_token, f"{start}{image_token}{end}", 1)


@dataclasses.dataclass
class EncodedBatch:
    """A padded batch of prompts (optionally followed by answers).

    input_ids: (B, T) int32; attention_mask: (B, T) int32, 1 = real token;
    answer_mask: (B, T) bool, True at answer tokens; prompt_lengths: (B,) int32, the
    number of prompt tokens (after image expansion, without answer and padding).
    """

    input_ids: np.ndarray  # (B, T) int32
    attention_mask: np.ndarray  # (B, T) int32
    answer_mask: np.ndarray  # (B, T) bool
    prompt_lengths: np.ndarray  # (B,) int32

    @property
    def lengths(self) -> np.ndarray:
        """(B,) int32: real tokens per row (prompt + answer)."""
        return self.attention_mask.sum(axis=1).astype(np.int32)


def _resolve_pad_id(tokenizer, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def encode_batch(
    tokenizer,
    prompts: Sequence[str],
    *,
    image_token: str,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    answers: Sequence[str | Sequence[int]] | None = None,
    padding_side: str = "left",
    pad_token_id: int | None = None,
) -> EncodedBatch:
    """Tokenise prompts (each with exactly one image token), expand the image token and pad.

    Each prompt is tokenised with ``add_special_tokens=True`` (BOS where the tokenizer
    adds one); its single ``image_token_id`` is replaced by ``num_image_tokens`` copies
    (one count for every prompt, or one per prompt: InternVL's tiles differ per image),
    as the transformers processors do. If ``answers`` are given, each answer's ids
    (``add_special_tokens=False``, no EOS) are appended and marked in ``answer_mask``.
    An answer may also be a list of token ids (e.g. what `generate` produced): they are used
    as they are, since decoding and re-tokenising text need not give the same ids back.
    Rows are padded to the longest on ``padding_side`` with ``pad_token_id`` (else the
    tokenizer's pad id, else its EOS id, else 0).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    counts = [num_image_tokens] * len(prompts) if np.ndim(num_image_tokens) == 0 else list(num_image_tokens)
    if len(counts) != len(prompts):
        raise ValueError(f"got {len(counts)} image-token counts for {len(prompts)} prompts")
    if min(counts) < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {min(counts)}")
    mapped = tokenizer.convert_tokens_to_ids(image_token)
    if mapped != image_token_id:
        raise ValueError(
            f"tokenizer maps image token {image_token!r} to id {mapped}, expected {image_token_id}; "
            "register it as a special token of the tokenizer"
        )
    if answers is not None:
        answers = list(answers)
        if len(answers) != len(prompts):
            raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts")
    pad_id = _resolve_pad_id(tokenizer, pad_token_id)

    rows: list[list[int]] = []
    prompt_lengths: list[int] = []
    answer_lengths: list[int] = []
    for i, prompt in enumerate(prompts):
        ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
        n_img = sum(1 for t in ids if t == image_token_id)
        if n_img != 1:
            raise ValueError(f"prompt {i} has {n_img} image tokens, expected exactly 1: {prompt!r}")
        k = ids.index(image_token_id)
        ids = ids[:k] + [image_token_id] * int(counts[i]) + ids[k + 1 :]
        prompt_lengths.append(len(ids))
        if answers is not None:
            if isinstance(answers[i], str):
                ans = list(tokenizer(answers[i], add_special_tokens=False).input_ids)
            else:
                ans = [int(t) for t in answers[i]]
            if not ans:
                raise ValueError(f"answer {i} ({answers[i]!r}) tokenises to no tokens")
            if image_token_id in ans:
                raise ValueError(f"answer {i} ({answers[i]!r}) contains the image token")
            ids = ids + ans
            answer_lengths.append(len(ans))
        else:
            answer_lengths.append(0)
        rows.append(ids)

    batch, width = len(rows), max(len(r) for r in rows)
    input_ids = np.full((batch, width), pad_id, dtype=np.int32)  # (B, T)
    attention_mask = np.zeros((batch, width), dtype=np.int32)  # (B, T)
    answer_mask = np.zeros((batch, width), dtype=bool)  # (B, T)
    for b, ids in enumerate(rows):
        start = width - len(ids) if padding_side == "left" else 0
        input_ids[b, start : start + len(ids)] = ids
        attention_mask[b, start : start + len(ids)] = 1
        a0 = start + prompt_lengths[b]
        answer_mask[b, a0 : a0 + answer_lengths[b]] = True
    return EncodedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        answer_mask=answer_mask,
        prompt_lengths=np.asarray(prompt_lengths, dtype=np.int32),  # (B,)
    )


GROUPS = ("system", "image", "user", "answer")


@dataclasses.dataclass
class TokenSpans:
    """Token groups of a batch as boolean masks (B, T) plus the image block bounds (B,).

    ``image_end`` is exclusive. Padding belongs to no group.
    """

    system: np.ndarray  # (B, T) bool
    image: np.ndarray  # (B, T) bool
    user: np.ndarray  # (B, T) bool
    answer: np.ndarray  # (B, T) bool
    image_start: np.ndarray  # (B,) int32
    image_end: np.ndarray  # (B,) int32

    def as_dict(self) -> dict[str, np.ndarray]:
        """The masks (B, T) and image bounds (B,) by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def counts(self) -> dict[str, np.ndarray]:
        """Number of tokens per group and row: name -> (B,) int32."""
        return {g: getattr(self, g).sum(axis=1).astype(np.int32) for g in GROUPS}

    def ranges(self) -> list[dict[str, tuple[int, int] | None]]:
        """Per row, each group's extent as (start, end) with end exclusive; None if empty."""
        out = []
        for b in range(self.image.shape[0]):
            row: dict[str, tuple[int, int] | None] = {}
            for g in GROUPS:
                idx = np.flatnonzero(getattr(self, g)[b])
                row[g] = (int(idx[0]), int(idx[-1]) + 1) if idx.size else None
            out.append(row)
        return out

    def summary(self) -> str:
        """One line per row: ``row b: system [s, e) n=.. image [..) user [..) answer [..)``."""
        lines = []
        counts = self.counts()
        for b, row in enumerate(self.ranges()):
            parts = []
            for g in GROUPS:
                r = row[g]
                extent = f"[{r[0]}, {r[1]})" if r is not None else "-"
                parts.append(f"{g} {extent} n={int(counts[g][b])}")
            lines.append(f"row {b}: " + "  ".join(parts))
        return "\n".join(lines)


def token_spans(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_token_id: int,
    answer_mask: np.ndarray | None = None,
) -> TokenSpans:
    """Compute the S/T/U/A token groups of a batch from its ids (pure numpy).

    input_ids: (B, T); attention_mask: (B, T), 1 = real token (None = all real);
    answer_mask: (B, T) bool or None (no answer tokens). Every row needs an image
    token, else ValueError naming the row. S: the tokens before the row's first
    image token; T: the image tokens (of every image of the row); U: the other
    non-answer tokens after the first image token (text between images included).
    """
    input_ids = np.asarray(input_ids)  # (B, T)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {input_ids.shape}")
    batch, width = input_ids.shape
    real = np.ones((batch, width), bool) if attention_mask is None else np.asarray(attention_mask) == 1  # (B, T)
    answer = np.zeros((batch, width), bool) if answer_mask is None else np.asarray(answer_mask, dtype=bool)
    if real.shape != input_ids.shape or answer.shape != input_ids.shape:
        raise ValueError(
            f"mask shapes {real.shape} / {answer.shape} do not match input_ids {input_ids.shape}"
        )
    answer = answer & real
    image = (input_ids == image_token_id) & real  # (B, T)
    if (image & answer).any():
        raise ValueError("answer_mask covers image tokens")

    image_start = np.zeros(batch, np.int32)
    image_end = np.zeros(batch, np.int32)
    for b in range(batch):
        idx = np.flatnonzero(image[b])
        if idx.size == 0:
            raise ValueError(f"row {b} has no image token (id {image_token_id})")
        image_start[b], image_end[b] = int(idx[0]), int(idx[-1]) + 1

    pos = np.arange(width)[None, :]  # (1, T)
    system = real & (pos < image_start[:, None])  # (B, T)
    user = real & (pos > image_start[:, None]) & ~image & ~answer  # (B, T)
    return TokenSpans(
        system=system,
        image=image,
        user=user,
        answer=answer,
        image_start=image_start,
        image_end=image_end,
    )
