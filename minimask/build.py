"""`build_model(cfg)`: the one place that reads a model Config and turns it into modules.

Every module below takes plain keyword arguments; this file is the map from config fields to those arguments, so
reading it top to bottom shows the whole model of a preset.
"""
import torch

from minimask.config import Config, ModelConfig
from minimask.data.images import num_channels
from minimask.interop.torchvision_conventions import TorchvisionRoIHeads, TorchvisionRPN
from minimask.model.box_head import BoxPredictor, ConvFCHead
from minimask.model.cascade import CascadeRoIHeads
from minimask.model.fpn import FPN
from minimask.model.keypoint_head import KeypointHead
from minimask.model.mask_head import MaskHead
from minimask.model.mask_rcnn import MaskRCNN
from minimask.model.resnet import ResNet
from minimask.model.roi_heads import RoIHeads
from minimask.model.rpn import RPN

FEATURE_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)  # P2..P5, pooled by the RoI heads


def build_model(cfg: Config) -> MaskRCNN:
    """Mask R-CNN (or Faster / Keypoint / Cascade R-CNN, by the config's switches) with random initialisation."""
    m = cfg.model
    channels = num_channels(cfg.input.modalities)
    if len(m.pixel_mean) != channels or len(m.pixel_std) != channels:
        raise ValueError(f"input.modalities={tuple(cfg.input.modalities)} makes {channels} input channels, but "
                         f"model.pixel_mean has {len(m.pixel_mean)} values and model.pixel_std {len(m.pixel_std)}: "
                         f"give one per channel (python -m minimask.data.pixel_stats measures them)")
    backbone = ResNet(
        in_channels=channels,
        depth=m.backbone.depth,
        groups=m.backbone.groups,
        width_per_group=m.backbone.width_per_group,
        norm=m.backbone.norm,
        stride_in_1x1=m.backbone.stride_in_1x1,
        freeze_at=m.backbone.freeze_at,
        freeze_norms=m.backbone.freeze_norms,
    )
    fpn = FPN(in_channels=list(backbone.out_channels.values()), out_channels=m.fpn.out_channels, norm=m.fpn.norm)
    model = MaskRCNN(
        backbone=backbone,
        fpn=fpn,
        rpn=build_rpn(m, strides=tuple(fpn.strides)),
        roi_heads=build_roi_heads(m),
        num_classes=m.roi_heads.num_classes,
        num_keypoints=m.keypoint_head.num_keypoints if m.keypoint_head.enabled else 0,
        input_format=m.input_format,
        pixel_scale=m.pixel_scale,
        pixel_mean=m.pixel_mean,
        pixel_std=m.pixel_std,
        in_channels=channels,
        size_divisibility=m.size_divisibility,
        channels_last=m.channels_last,
        images_per_canvas=m.images_per_canvas,
    )
    if m.compile_backbone:
        model.backbone.compile()
        model.fpn.compile()
    return model.to(memory_format=torch.channels_last) if m.channels_last else model


def build_rpn(m: ModelConfig, *, strides: tuple) -> RPN:
    rpn_class = TorchvisionRPN if m.torchvision_conventions else RPN
    return rpn_class(
        in_channels=m.fpn.out_channels,
        strides=strides,
        anchor_sizes=m.rpn.anchor_sizes,
        aspect_ratios=m.rpn.aspect_ratios,
        anchor_offset=m.rpn.anchor_offset,
        fg_iou=m.rpn.fg_iou,
        bg_iou=m.rpn.bg_iou,
        batch_size_per_image=m.rpn.batch_size_per_image,
        positive_fraction=m.rpn.positive_fraction,
        box_reg_loss=m.rpn.box_reg_loss,
        smooth_l1_beta=m.rpn.smooth_l1_beta,
        pre_nms_topk_train=m.rpn.pre_nms_topk_train,
        pre_nms_topk_test=m.rpn.pre_nms_topk_test,
        post_nms_topk_train=m.rpn.post_nms_topk_train,
        post_nms_topk_test=m.rpn.post_nms_topk_test,
        nms_thresh=m.rpn.nms_thresh,
        min_size=m.rpn.min_size,
        head_conv_depth=m.rpn.head_conv_depth,
        ignore_iof_thr=m.ignore_iof_thr,
    )


def build_roi_heads(m: ModelConfig) -> RoIHeads:
    """The box head(s) and predictor(s), the mask and keypoint heads, and the RoI heads that run them."""
    num_classes = m.roi_heads.num_classes
    mask_head = keypoint_head = None
    if m.mask_head.enabled:
        mask_head = MaskHead(in_channels=m.fpn.out_channels, conv_dims=m.mask_head.conv_dims, norm=m.mask_head.norm,
                             num_classes=num_classes)
    if m.keypoint_head.enabled:
        keypoint_head = KeypointHead(in_channels=m.fpn.out_channels, conv_dims=m.keypoint_head.conv_dims,
                                     num_keypoints=m.keypoint_head.num_keypoints)
    common = dict(
        mask_head=mask_head,
        keypoint_head=keypoint_head,
        num_classes=num_classes,
        feature_scales=FEATURE_SCALES,
        box_resolution=m.box_head.resolution,
        mask_resolution=m.mask_head.resolution,
        mask_rois_per_image=m.mask_head.train_rois_per_image,
        keypoint_resolution=m.keypoint_head.resolution,
        sampling_ratio=m.roi_heads.sampling_ratio,
        aligned=m.roi_heads.aligned,
        batch_size_per_image=m.roi_heads.batch_size_per_image,
        positive_fraction=m.roi_heads.positive_fraction,
        append_gt=m.roi_heads.append_gt,
        box_reg_loss=m.box_head.reg_loss,
        smooth_l1_beta=m.box_head.smooth_l1_beta,
        score_thresh=m.roi_heads.score_thresh,
        nms_thresh=m.roi_heads.nms_thresh,
        detections_per_image=m.roi_heads.detections_per_image,
        mask_size=2 * m.mask_head.resolution,
        keypoint_heatmap_size=m.keypoint_head.heatmap_size,
        keypoint_loss_weight=m.keypoint_head.loss_weight,
        keypoint_classes=m.keypoint_head.classes,
        ignore_iof_thr=m.ignore_iof_thr,
    )

    def box_head():
        return ConvFCHead(in_channels=m.fpn.out_channels, resolution=m.box_head.resolution,
                          conv_dims=m.box_head.conv_dims, fc_dims=m.box_head.fc_dims, norm=m.box_head.norm)

    if m.cascade.enabled:
        if m.torchvision_conventions:
            raise ValueError("torchvision has no Cascade R-CNN: model.cascade.enabled and "
                             "model.torchvision_conventions cannot both be set")
        heads = [box_head() for _ in m.cascade.ious]
        return CascadeRoIHeads(
            box_heads=heads,
            box_predictors=[BoxPredictor(in_features=h.out_features, num_classes=num_classes, class_agnostic=True)
                            for h in heads],
            stage_ious=m.cascade.ious,
            stage_reg_weights=m.cascade.reg_weights,
            **common,
        )
    head = box_head()
    roi_heads_class = TorchvisionRoIHeads if m.torchvision_conventions else RoIHeads
    return roi_heads_class(
        box_head=head,
        box_predictor=BoxPredictor(in_features=head.out_features, num_classes=num_classes,
                                   class_agnostic=m.box_head.class_agnostic),
        fg_iou=m.roi_heads.fg_iou,
        box_reg_weights=m.box_head.reg_weights,
        **common,
    )
