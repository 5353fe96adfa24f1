"""apt-deploy: train prompt-tuned vision-language models in PyTorch, deploy them fast.

Public API (lazy: importing ``apt_deploy`` does not import torch)::

    from apt_deploy import APTConfig, apply_apt, fold, save_prompts, load_prompts
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "APTConfig": "apt_deploy.methods.apt",
    "apply_apt": "apt_deploy.tuning",
    "apply_deep_prompt": "apt_deploy.tuning",
    "SDPTConfig": "apt_deploy.methods.sdpt",
    "apply_sdpt": "apt_deploy.tuning",
    "trainable_parameters": "apt_deploy.tuning",
    "fold": "apt_deploy.folding",
    "save_prompts": "apt_deploy.checkpoint",
    "load_prompts": "apt_deploy.checkpoint",
    "get_backbone": "apt_deploy.backbones",
    "known_backbones": "apt_deploy.backbones",
    "Predictor": "apt_deploy.serving.predict",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'apt_deploy' has no attribute {name!r}")
