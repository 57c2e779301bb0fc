"""CapeNext models: backbones, the frozen CLIP, HCMI, DSFR, encoder, proposals, graph decoder, heads.

``build_model(cfg.model)`` assembles any registered ablation x backbone (see ``capenext.py``).
Weights come only from local files or a seeded random init; the entry points set ``HF_HUB_OFFLINE=1``
(:func:`capenext.cli.run_main`) so that no library below ever tries a hub download.
"""

from capenext.models.backbone import available_backbones, create_backbone, register_backbone
from capenext.models.capenext import (
    Ablation,
    CapeNext,
    available_ablations,
    build_model,
    get_ablation,
    parameter_counts,
    register_ablation,
)
from capenext.models.clip import FrozenCLIP, class_prompt

__all__ = [
    "Ablation", "CapeNext", "FrozenCLIP", "available_ablations", "available_backbones", "build_model",
    "class_prompt", "create_backbone", "get_ablation", "parameter_counts", "register_ablation",
    "register_backbone",
]
