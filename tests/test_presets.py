"""Presets against the detectron2 config files they follow (minimask.config.PRESET_SOURCES).

Each preset's effective training settings - the learning rate train.py actually uses at the preset's batch
(`minimask.engine.solver.training_lr`), the schedule, warm-up, input sizes and scale jitter, sampling sizes, loss types -
are written in detectron2's terms and compared with the values its config file resolves to. Those values are
written out below, file by file, following each file's `_BASE_` chain down to detectron2's `config/defaults.py`;
where detectron2 is installed, `get_cfg()` + `merge_from_file` must give the same values. The only differences
allowed are `minimask.config.PRESET_DEVIATIONS`, each with its reason.
"""
import math
from pathlib import Path

import pytest

from minimask.config import PRESET_DEVIATIONS, PRESET_SOURCES, PRESETS, get_config
from minimask.engine.solver import training_lr

# detectron2 config/defaults.py, for the keys compared here.
D2_DEFAULTS = {
    "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.001, "SOLVER.MAX_ITER": 40000, "SOLVER.STEPS": (30000,),
    "SOLVER.GAMMA": 0.1, "SOLVER.WARMUP_ITERS": 1000, "SOLVER.WARMUP_FACTOR": 1.0 / 1000,
    "SOLVER.WARMUP_METHOD": "linear", "SOLVER.MOMENTUM": 0.9, "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0, "SOLVER.CLIP_GRADIENTS.ENABLED": False, "SOLVER.AMP.ENABLED": False,
    "TEST.PRECISE_BN.ENABLED": False, "TEST.PRECISE_BN.NUM_ITER": 200,
    "INPUT.MIN_SIZE_TRAIN": (800,), "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice", "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800, "INPUT.MAX_SIZE_TEST": 1333, "INPUT.RANDOM_FLIP": "horizontal",
    "INPUT.MASK_FORMAT": "polygon", "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
    "MODEL.MASK_ON": False, "MODEL.KEYPOINT_ON": False, "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
    "MODEL.RPN.IOU_THRESHOLDS": (0.3, 0.7), "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256, "MODEL.RPN.POSITIVE_FRACTION": 0.5,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000, "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": "smooth_l1", "MODEL.RPN.SMOOTH_L1_BETA": 0.0,
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": (0.5,), "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25, "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "smooth_l1", "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0), "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False,
    "MODEL.ROI_BOX_CASCADE_HEAD.IOUS": (0.5, 0.6, 0.7),
    "MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT": 1.0, "MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE": 1,
    "MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS": True,
}
_3X = {"SOLVER.STEPS": (210000, 250000), "SOLVER.MAX_ITER": 270000}
_9X = {"SOLVER.IMS_PER_BATCH": 64, "SOLVER.STEPS": (187500, 197500), "SOLVER.MAX_ITER": 202500, "SOLVER.BASE_LR": 0.08}
# config file -> (its _BASE_, what it sets among the keys above)
D2_FILES = {
    "Base-RCNN-FPN.yaml": (None, {
        "MODEL.ROI_HEADS.NAME": "StandardROIHeads", "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000, "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.02,
        "SOLVER.STEPS": (60000, 80000), "SOLVER.MAX_ITER": 90000,
        "INPUT.MIN_SIZE_TRAIN": (640, 672, 704, 736, 768, 800)}),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml": ("Base-RCNN-FPN.yaml", {"MODEL.MASK_ON": True, **_3X}),
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml": ("Base-RCNN-FPN.yaml", {"MODEL.MASK_ON": True, **_3X}),
    "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml": ("Base-RCNN-FPN.yaml", {"MODEL.MASK_ON": False, **_3X}),
    "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml": ("Base-RCNN-FPN.yaml", {"MODEL.MASK_ON": False, **_3X}),
    "COCO-Keypoints/Base-Keypoint-RCNN-FPN.yaml": ("Base-RCNN-FPN.yaml", {
        "MODEL.KEYPOINT_ON": True, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.5, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1500}),
    "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml": ("COCO-Keypoints/Base-Keypoint-RCNN-FPN.yaml", _3X),
    "COCO-Keypoints/keypoint_rcnn_R_101_FPN_3x.yaml": ("COCO-Keypoints/Base-Keypoint-RCNN-FPN.yaml", _3X),
    "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml": ("Base-RCNN-FPN.yaml", {
        "MODEL.MASK_ON": True, "MODEL.ROI_HEADS.NAME": "CascadeROIHeads",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": True, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000, **_3X}),
    "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml": ("Base-RCNN-FPN.yaml", {"MODEL.MASK_ON": True, **_3X}),
    "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml": ("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml", {"MODEL.MASK_ON": True}),
    "Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml": ("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml", {"MODEL.MASK_ON": True, **_9X}),
    "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml": ("Base-RCNN-FPN.yaml", {
        "MODEL.MASK_ON": True, "TEST.PRECISE_BN.ENABLED": True, **_3X}),
    "Misc/scratch_mask_rcnn_R_50_FPN_9x_syncbn.yaml": ("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml", {
        "MODEL.MASK_ON": True, **_9X}),
}


def resolved(config_file: str) -> dict:
    """detectron2's values for `config_file`: defaults, then each _BASE_ from the root down, then the file."""
    base, own = D2_FILES[config_file]
    return {**(resolved(base) if base else D2_DEFAULTS), **own}


def _loss(kind: str, beta: float) -> str:
    """A box-regression loss in one form for both libraries: detectron2's smooth_l1 at beta 0 is L1."""
    return "l1" if kind == "l1" or beta == 0 else f"smooth_l1(beta={beta})"


def training_settings_d2(v: dict) -> dict:
    """The compared settings from detectron2 values (`resolved`, or a loaded CfgNode flattened)."""
    mask, keypoint, cascade = v["MODEL.MASK_ON"], v["MODEL.KEYPOINT_ON"], v["MODEL.ROI_HEADS.NAME"] == "CascadeROIHeads"
    s = {
        "lr": v["SOLVER.BASE_LR"], "batch": v["SOLVER.IMS_PER_BATCH"], "max_iter": v["SOLVER.MAX_ITER"],
        "steps": tuple(v["SOLVER.STEPS"]), "gamma": v["SOLVER.GAMMA"], "warmup_iters": v["SOLVER.WARMUP_ITERS"],
        "warmup_factor": v["SOLVER.WARMUP_FACTOR"], "warmup_method": v["SOLVER.WARMUP_METHOD"],
        "momentum": v["SOLVER.MOMENTUM"], "weight_decay": v["SOLVER.WEIGHT_DECAY"],
        "weight_decay_norm": v["SOLVER.WEIGHT_DECAY_NORM"], "clip_gradients": v["SOLVER.CLIP_GRADIENTS.ENABLED"],
        "amp": v["SOLVER.AMP.ENABLED"],
        "precise_bn_iters": v["TEST.PRECISE_BN.NUM_ITER"] if v["TEST.PRECISE_BN.ENABLED"] else 0,
        "min_size_train": tuple(v["INPUT.MIN_SIZE_TRAIN"]), "size_sampling": v["INPUT.MIN_SIZE_TRAIN_SAMPLING"],
        "max_size_train": v["INPUT.MAX_SIZE_TRAIN"], "min_size_test": v["INPUT.MIN_SIZE_TEST"],
        "max_size_test": v["INPUT.MAX_SIZE_TEST"], "flip": v["INPUT.RANDOM_FLIP"],
        "filter_empty": v["DATALOADER.FILTER_EMPTY_ANNOTATIONS"],
        "rpn_iou": tuple(v["MODEL.RPN.IOU_THRESHOLDS"]), "rpn_batch": v["MODEL.RPN.BATCH_SIZE_PER_IMAGE"],
        "rpn_positive_fraction": v["MODEL.RPN.POSITIVE_FRACTION"],
        "rpn_pre_nms_topk_train": v["MODEL.RPN.PRE_NMS_TOPK_TRAIN"],
        "rpn_post_nms_topk_train": v["MODEL.RPN.POST_NMS_TOPK_TRAIN"], "rpn_nms": v["MODEL.RPN.NMS_THRESH"],
        "rpn_loss": _loss(v["MODEL.RPN.BBOX_REG_LOSS_TYPE"], v["MODEL.RPN.SMOOTH_L1_BETA"]),
        "roi_iou": tuple(v["MODEL.ROI_HEADS.IOU_THRESHOLDS"]), "roi_batch": v["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"],
        "roi_positive_fraction": v["MODEL.ROI_HEADS.POSITIVE_FRACTION"],
        "append_gt": v["MODEL.ROI_HEADS.PROPOSAL_APPEND_GT"],
        "box_loss": _loss(v["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE"], v["MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA"]),
        "box_reg_weights": tuple(v["MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS"]),
        "class_agnostic": v["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"],
        "mask": mask, "keypoint": keypoint, "cascade": cascade,
    }
    if mask:
        s |= {"mask_format": v["INPUT.MASK_FORMAT"], "mask_rois": "all"}
    if keypoint:
        s |= {"keypoint_loss_weight": v["MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT"],
              "min_keypoints_per_image": v["MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE"],
              "keypoint_loss_by_visible": v["MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS"]}
    if cascade:
        s |= {"cascade_ious": tuple(v["MODEL.ROI_BOX_CASCADE_HEAD.IOUS"])}
    return s


# compared setting -> the config key a deviation names (settings minimask fixes in code map to None)
CONFIG_KEY = {
    "lr": "solver.lr", "batch": "solver.batch_size", "max_iter": "solver.max_iter", "steps": "solver.steps",
    "min_size_train": "input.min_size_train", "max_size_train": "input.max_size_train",
    "min_size_test": "input.min_size_test", "max_size_test": "input.max_size_test",
}


def training_settings(preset: str) -> dict:
    """The same settings as minimask trains them for `preset`."""
    cfg = get_config(preset)
    m, s, i = cfg.model, cfg.solver, cfg.input
    out = {
        "lr": training_lr(s.lr, s.base_lr, s.batch_size),  # what train.py uses
        "batch": s.batch_size, "max_iter": s.max_iter, "steps": tuple(s.steps), "gamma": s.gamma,
        "warmup_iters": s.warmup_iters, "warmup_factor": s.warmup_factor,
        "warmup_method": "linear",  # minimask.engine.solver.lr_at
        "momentum": s.momentum, "weight_decay": s.weight_decay, "weight_decay_norm": s.weight_decay_norm,
        "clip_gradients": s.clip_grad_norm > 0, "amp": s.amp, "precise_bn_iters": s.precise_bn_iters,
        "min_size_train": tuple(i.min_size_train), "size_sampling": "choice",  # minimask.data.transforms.Resize
        "max_size_train": i.max_size_train, "min_size_test": i.min_size_test, "max_size_test": i.max_size_test,
        "flip": "horizontal" if i.horizontal_flip else "none", "filter_empty": cfg.data.filter_empty,
        "rpn_iou": (m.rpn.bg_iou, m.rpn.fg_iou), "rpn_batch": m.rpn.batch_size_per_image,
        "rpn_positive_fraction": m.rpn.positive_fraction, "rpn_pre_nms_topk_train": m.rpn.pre_nms_topk_train,
        "rpn_post_nms_topk_train": m.rpn.post_nms_topk_train, "rpn_nms": m.rpn.nms_thresh,
        "rpn_loss": _loss(m.rpn.box_reg_loss, m.rpn.smooth_l1_beta),
        "roi_iou": (m.roi_heads.fg_iou,), "roi_batch": m.roi_heads.batch_size_per_image,
        "roi_positive_fraction": m.roi_heads.positive_fraction, "append_gt": m.roi_heads.append_gt,
        "box_loss": _loss(m.box_head.reg_loss, m.box_head.smooth_l1_beta),
        "box_reg_weights": tuple(m.box_head.reg_weights), "class_agnostic": m.box_head.class_agnostic,
        "mask": m.mask_head.enabled, "keypoint": m.keypoint_head.enabled, "cascade": m.cascade.enabled,
    }
    if m.mask_head.enabled:
        out |= {"mask_format": i.mask_format, "mask_rois": m.mask_head.train_rois_per_image or "all"}
    if m.keypoint_head.enabled:
        out |= {"keypoint_loss_weight": m.keypoint_head.loss_weight,
                "min_keypoints_per_image": cfg.data.min_keypoints_per_image,
                "keypoint_loss_by_visible": True}  # minimask.model.keypoint_head.keypoint_loss
    if m.cascade.enabled:
        out |= {"cascade_ious": tuple(m.cascade.ious)}
    return out


def _differences(ours: dict, theirs: dict) -> dict:
    keys = ours.keys() | theirs.keys()
    return {k: (ours.get(k), theirs.get(k)) for k in sorted(keys)
            if not (isinstance(ours.get(k), float) and isinstance(theirs.get(k), float)
                    and math.isclose(ours[k], theirs[k], rel_tol=1e-12)) and ours.get(k) != theirs.get(k)}


def test_every_d2_preset_names_its_source():
    missing = [name for name in PRESETS if name.startswith("d2_") and name not in PRESET_SOURCES]
    assert not missing, f"d2_* presets without an entry in PRESET_SOURCES: {missing}"
    assert set(PRESET_SOURCES) <= set(PRESETS) and set(PRESET_DEVIATIONS) <= set(PRESET_SOURCES)
    assert set(PRESET_SOURCES.values()) <= set(D2_FILES), "a source without its resolved values in D2_FILES"
    for name in PRESETS:  # a d2_* preset follows the file of its own name
        if name.startswith("d2_"):
            assert PRESET_SOURCES[name].rsplit("/", 1)[-1] == name.removeprefix("d2_") + ".yaml"


@pytest.mark.parametrize("preset", sorted(PRESET_SOURCES))
def test_training_settings_equal_the_source(preset):
    differences = _differences(training_settings(preset), training_settings_d2(resolved(PRESET_SOURCES[preset])))
    allowed = PRESET_DEVIATIONS.get(preset, {})
    unexplained = {k: v for k, v in differences.items() if CONFIG_KEY.get(k) not in allowed}
    assert not unexplained, f"{preset} differs from {PRESET_SOURCES[preset]} (minimask, detectron2): {unexplained}"
    stale = set(allowed) - {CONFIG_KEY.get(k) for k in differences}
    assert not stale, f"{preset}: PRESET_DEVIATIONS lists {stale}, which equal the source"
    assert all(reason.strip() for reason in allowed.values())


def test_the_9x_presets_train_at_detectron2s_lr():
    """detectron2's 9x files: BASE_LR 0.08 at IMS_PER_BATCH 64 (the LR train.py uses, not 4x it)."""
    for name in ("d2_scratch_mask_rcnn_R_50_FPN_9x_gn", "d2_scratch_mask_rcnn_R_50_FPN_9x_syncbn"):
        s = get_config(name).solver
        assert s.batch_size == 64 and training_lr(s.lr, s.base_lr, s.batch_size) == pytest.approx(0.08)
    assert training_lr(0.0, 0.02, 16) == 0.02 and training_lr(0.5, 0.02, 16) == 0.5  # an explicit lr wins


def test_keypoint_preset_trains_at_detectron2s_scales():
    assert get_config("r50_fpn_gn_keypoint").input.min_size_train == (640, 672, 704, 736, 768, 800)


def _d2_config_dir():
    detectron2 = pytest.importorskip("detectron2")
    root = Path(detectron2.__file__).resolve().parent
    for candidate in (root / "model_zoo" / "configs", root.parent / "configs"):
        if candidate.is_dir():
            return candidate
    pytest.skip("detectron2 is installed without its configs/ folder")


@pytest.mark.parametrize("config_file", sorted(set(PRESET_SOURCES.values())))
def test_resolved_values_equal_detectron2s_own_config(config_file):
    """Where detectron2 is installed: its get_cfg() + merge_from_file gives the values written out above."""
    configs = _d2_config_dir()
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(configs / config_file))

    def lookup(key):
        node = cfg
        for part in key.split("."):
            node = node[part]
        return tuple(node) if isinstance(node, list) else node

    values = {key: lookup(key) for key in D2_DEFAULTS}
    assert _differences(training_settings_d2(values), training_settings_d2(resolved(config_file))) == {}
