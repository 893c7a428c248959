"""The paper's instruments as pure, jit-compiled functions (see docs/analysis.md)."""
# LLaVA-CAM, attention shares, information-flow saliency (issue 3)
from jaxflow.analysis.attention import AttentionResult, attention_analysis, attention_shares
from jaxflow.analysis.cam import CamResult, cam_site, llava_cam, llava_cam_per_token, llava_cams
from jaxflow.analysis.flow import FlowResult, information_flow, saliency
from jaxflow.analysis.logit_lens import (LensReport, LogitLensResult, last_positions, lens_report, logit_lens,
                                         run_logit_lens)
from jaxflow.analysis.probes import (ProbeError, ProbeFeatures, ProbeResult, ProbeTarget, probe_features, run_probes,
                                     train_probes)
