"""Presets and key=value overrides."""
import dataclasses

import pytest

from minimask.config import PRESETS, Config, get_config, to_dict


def test_every_preset_builds_a_config():
    required = {"r50_fpn_gn", "r101_fpn_gn", "x101_32x8d_fpn_gn", "x152_32x8d_fpn_gn", "r50_fpn_syncbn",
                "r50_fpn_frozenbn", "r50_fpn_gn_cascade", "r50_fpn_gn_keypoint", "r50_fpn_gn_box", "tiny",
                "tiny_keypoint", "demo"}
    assert required <= set(PRESETS)
    for name in PRESETS:
        assert isinstance(get_config(name), Config)


def test_default_is_the_papers_model():
    cfg = get_config()
    assert cfg.model.backbone.depth == 50 and cfg.model.backbone.norm == "GN" and cfg.model.backbone.freeze_at == 0
    assert cfg.model.fpn.norm == "GN" and cfg.model.box_head.conv_dims == (256,) * 4 and cfg.model.box_head.fc_dims == (1024,)
    assert cfg.model.mask_head.enabled and not cfg.model.keypoint_head.enabled and not cfg.model.cascade.enabled


def test_preset_specifics():
    x152 = get_config("x152_32x8d_fpn_gn").model.backbone
    assert (x152.depth, x152.groups, x152.width_per_group) == (152, 32, 8)
    frozen = get_config("r50_fpn_frozenbn").model
    assert frozen.backbone.norm == "FrozenBN" and frozen.box_head.conv_dims == () and frozen.box_head.fc_dims == (1024, 1024)
    assert frozen.fpn.norm == ""
    kp = get_config("r50_fpn_gn_keypoint").model
    assert kp.keypoint_head.enabled and not kp.mask_head.enabled and kp.roi_heads.num_classes == 1
    assert kp.rpn.post_nms_topk_train == 1500
    assert get_config("r50_fpn_gn_cascade").model.cascade.enabled
    assert not get_config("r50_fpn_gn_box").model.mask_head.enabled
    assert get_config("r50_fpn_syncbn").model.box_head.norm == "SyncBN"


def test_overrides_parse_by_field_type():
    cfg = get_config("tiny", ["model.backbone.depth=34", "solver.base_lr=1", "solver.steps=[5, 9]",
                              "input.min_size_train=96", "model.fpn.norm=", "model.mask_head.enabled=False"])
    assert cfg.model.backbone.depth == 34
    assert cfg.solver.base_lr == 1.0 and isinstance(cfg.solver.base_lr, float)
    assert cfg.solver.steps == (5, 9)
    assert cfg.input.min_size_train == (96,)
    assert cfg.model.fpn.norm == ""
    assert cfg.model.mask_head.enabled is False
    # Presets are not mutated by overrides.
    assert get_config("tiny").model.backbone.depth == 18


@pytest.mark.parametrize("item, message", [
    ("model.backbone.dept=3", "unknown config key 'model.backbone.dept'"),
    ("model.nothing.depth=3", "unknown config key"),
    ("model.backbone=3", "unknown config key"),
    ("model.backbone.depth=deep", "expects a int"),
    ("model.backbone.depth=2.5", "expects a int"),
    ("model.mask_head.enabled=1", "expects a bool"),
    ("solver.base_lr=fast", "expects a float"),
    ("model.backbone.depth", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", [item])


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="r50_fpn_gn"):
        get_config("r51")


def test_to_dict_is_plain_data():
    d = to_dict(get_config("tiny"))
    assert d["model"]["backbone"]["depth"] == 18
    assert not any(dataclasses.is_dataclass(v) for v in d.values())
