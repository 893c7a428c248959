"""The toy LLaVA: synthetic shapes VQA where the answer's location is known (data, training)."""
import os

TOY_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "toy_llava")
