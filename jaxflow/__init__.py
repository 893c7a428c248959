"""jaxflow: information flow in vision-language models (LLaVA-1.5, InternVL, Qwen2-VL, Qwen2.5-VL, Qwen-VL),
in JAX/Flax.

Public entry points (any family; `model.family` names it):
    model = jaxflow.load("checkpoints/NAME")
    out = jaxflow.forward(model, input_ids, pixel_values, attention_mask=None)   # out.logits (B, T, V)
    gen = jaxflow.generate(model, input_ids, pixel_values, attention_mask, max_new_tokens=32)
"""
from jaxflow.analysis import (AttentionResult, CamResult, FlowResult, attention_analysis, attention_shares, cam_site,
                              information_flow, llava_cam, llava_cam_per_token, llava_cams, saliency)
from jaxflow.analysis.knockout import KnockoutSweep, knockout, knockout_sweep
from jaxflow.analysis.logit_lens import LogitLensResult, logit_lens
from jaxflow.analysis.probes import ProbeResult, probe_features, train_probes
from jaxflow.analysis.truncation import (SweepOutput, TruncationGenerateOutput, truncation_generate,
                                         truncation_sweep)
from jaxflow.convert import convert_checkpoint, from_state_dict, load, load_tokenizer, save_model
from jaxflow.forward import ForwardOutput, forward, image_features
from jaxflow.generate import GenerateOutput, generate
from jaxflow.models.config import LlavaConfig, load_config
from jaxflow.models.family import VisionLanguageModel, families
from jaxflow.models.internvl import InternVL, InternVLConfig
from jaxflow.models.llava import Llava
from jaxflow.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
from jaxflow.models.qwen_vl import QwenVL, QwenVLConfig

__version__ = "0.1.0"

__all__ = [
    "Llava", "LlavaConfig", "InternVL", "InternVLConfig", "Qwen2VL", "Qwen2VLConfig", "QwenVL", "QwenVLConfig",
    "VisionLanguageModel", "families", "load_config", "load", "load_tokenizer", "save_model", "convert_checkpoint", "from_state_dict",
    "forward", "ForwardOutput", "image_features", "generate", "GenerateOutput",
    "truncation_sweep", "SweepOutput", "truncation_generate", "TruncationGenerateOutput",
    "llava_cam", "llava_cams", "llava_cam_per_token", "cam_site", "CamResult", "attention_shares",
    "attention_analysis", "AttentionResult", "information_flow", "saliency", "FlowResult",
    "knockout", "knockout_sweep", "KnockoutSweep", "logit_lens", "LogitLensResult",
    "probe_features", "train_probes", "ProbeResult",
]
