"""sparse_prefill: per-head dynamic sparse attention (MInference patterns) for HuggingFace transformers prefill.

from sparse_prefill import patch_model, unpatch_model
patch_model(model)            # shipped config for the model, else the default
model.generate(**long_prompt)  # prefill sparse, decode stock
unpatch_model(model)
"""

from .config import ConfigError, HeadSpec, ModelInfo, SparseConfig, load_config, save_config
from .patch import is_patched, patch_model, resolve_config, unpatch_model
from .patches import UnsupportedModelError
from .report import last_report, report_json

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "HeadSpec",
    "ModelInfo",
    "SparseConfig",
    "UnsupportedModelError",
    "is_patched",
    "last_report",
    "load_config",
    "patch_model",
    "report_json",
    "resolve_config",
    "save_config",
    "unpatch_model",
]
