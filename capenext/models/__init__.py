"""CapeNext models: backbones, the frozen CLIP, HCMI, DSFR, encoder, proposals, graph decoder, heads.

``build_model(cfg.model)`` assembles any registered ablation x backbone (see ``capenext.py``).
No hub download is ever tried: ``HF_HUB_OFFLINE=1`` is set before timm and open_clip load.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from capenext.models.backbone import available_backbones, create_backbone, register_backbone  # noqa: E402
from capenext.models.capenext import (  # noqa: E402
    Ablation,
    CapeNext,
    available_ablations,
    build_model,
    get_ablation,
    parameter_counts,
    register_ablation,
)
from capenext.models.clip import FrozenCLIP, class_prompt  # noqa: E402

__all__ = [
    "Ablation", "CapeNext", "FrozenCLIP", "available_ablations", "available_backbones", "build_model",
    "class_prompt", "create_backbone", "get_ablation", "parameter_counts", "register_ablation",
    "register_backbone",
]
