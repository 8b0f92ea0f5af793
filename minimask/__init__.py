"""minimask: a readable, pure-PyTorch Mask R-CNN for "Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019).

    cfg = minimask.get_config("r50_fpn_gn", overrides=["model.backbone.depth=101"])
    model = minimask.build_model(cfg)
"""
from minimask.build import build_model
from minimask.config import Config, get_config

__all__ = ["Config", "build_model", "get_config"]
