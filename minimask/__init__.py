"""minimask: a readable, pure-PyTorch Mask R-CNN for "Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019).

    cfg = minimask.get_config("r50_fpn_gn", overrides=["model.backbone.depth=101"])
    model = minimask.build_model(cfg)
    model = minimask.from_checkpoint("model_final.pth")    # minimask or torchvision detection checkpoints
"""
from minimask.build import build_model
from minimask.config import Config, get_config
from minimask.interop.model_zoo import from_checkpoint

__all__ = ["Config", "build_model", "from_checkpoint", "get_config"]
