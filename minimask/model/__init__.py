"""The detector, one file per component of the paper's figures: ResNet (`resnet.py`) -> FPN (`fpn.py`) -> RPN
(`anchors.py`, `rpn.py`) -> RoI heads (`roi_heads.py` with `box_head.py`, `mask_head.py`, `keypoint_head.py`,
`cascade.py`), assembled in `mask_rcnn.py`; the norm layers (`norm.py`) and Detectron's initialisation
(`weight_init.py`). `minimask.build_model` builds it from a config."""
