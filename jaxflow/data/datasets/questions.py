"""The question text each prompt template's own evaluation sends for an item.

LLaVA-1.5's evaluation (templates vicuna_v1, llava_hf, and the chat templates of InternVL and
Qwen2-VL, which jaxflow evaluates the same way) sends ``Item.formatted_question``: the question with
LLaVA's instruction suffix. Qwen-VL's official evaluation (QwenLM/Qwen-VL ``eval_mm``, base model, no
chat format) words its prompts differently, and the ``qwen_vl`` template reproduces them:

- TextVQA (``evaluate_vqa.py``): ``<img>…</img>{question} Answer:`` (no OCR tokens, no suffix);
- POPE (no official script; the same VQA format): ``<img>…</img>{question} Answer:``;
- ScienceQA-IMG (``evaluate_multiple_choice.py``):
  ``<img>…</img>Context: {hint or N/A}\\nQuestion: {question}\\nOptions: A. …\\nB. …\\nAnswer:``;
- captions (``evaluate_caption.py``): ``<img>…</img>Describe the image in English:``.

The official ScienceQA script scores the likelihood of each option letter; jaxflow generates greedily
and reads the letter (docs/datasets.md).
"""
from __future__ import annotations

from jaxflow.data.datasets._common import Item

QWEN_VL_CAPTION_PROMPT = "Describe the image in English:"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def qwen_vl_question(item: Item) -> str:
    """The text Qwen-VL's evaluation puts after ``</img>``; a text ending in ":" is used as it is by the
    ``qwen_vl`` template, anything else gets `` Answer:`` appended."""
    if item.dataset == "scienceqa":
        hint = (item.metadata.get("hint") or "").strip() or "N/A"
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.metadata.get("choices") or ()))
        return f"Context: {hint}\nQuestion: {item.question}\nOptions: {options}\nAnswer:"
    if item.dataset in ("chair", "toy_caption"):
        return QWEN_VL_CAPTION_PROMPT
    return item.question


def template_question(item: Item, template: str) -> str:
    """The question to format with `template` (`jaxflow.data.prompts.format_prompt`)."""
    return qwen_vl_question(item) if template == "qwen_vl" else item.formatted_question
