"""Run configurations: nested dataclasses holding every setting, and named presets.

A preset is plain data: a name and a list of "dotted.key=value" overrides applied to the defaults below, which
are the paper's model (R50-FPN, GroupNorm everywhere it belongs, 4conv1fc box head, trained from random init).
`get_config(name, overrides)` returns a fresh `Config`; only the builders (`minimask.build_model`, and the
trainer) read it. Modules never see a Config: they take plain keyword arguments.

Each field's comment names where its default comes from. Sources: D2 = detectron2 (configs/Base-RCNN-FPN.yaml,
config/defaults.py, the scratch_* and *_gn configs), D1 = Detectron, TV = torchvision, Paper = "Rethinking
ImageNet Pre-training" (He, Girshick, Dollar 2019), FPN = Lin et al. 2017.
"""
import ast
import copy
import dataclasses
import typing
from dataclasses import dataclass, field


@dataclass
class BackboneConfig:
    depth: int = 50  # Paper: R50 is the main model; 18/34/50/101/152
    groups: int = 1  # ResNeXt cardinality (32 for X101/X152); groups apply to the 3x3 convs only
    width_per_group: int = 64  # 64 for ResNet, 4 or 8 for ResNeXt 32x4d / 32x8d (D2 X_101_32x8d yaml)
    norm: str = "GN"  # Paper Sec. 3: GN or SyncBN when training from scratch; "BN", "SyncBN", "GN", "FrozenBN", ""
    stride_in_1x1: bool = False  # D2: False for all GN and scratch configs (stride on the 3x3, as torchvision)
    freeze_at: int = 0  # D2 scratch configs: 0 = nothing frozen (freezing costs ~3 AP from scratch, D1 GN README)
    freeze_norms: bool = True  # D2: frozen stages' BN become FrozenBN; TV _resnet_fpn_extractor keeps BatchNorm2d


@dataclass
class FPNConfig:
    out_channels: int = 256  # FPN Sec. 3 / D2 FPN.OUT_CHANNELS
    norm: str = "GN"  # D2 mask_rcnn_R_50_FPN_3x_gn.yaml: GN on lateral and output convs


@dataclass
class RPNConfig:
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # FPN Sec. 4.1: one size per level P2..P6
    aspect_ratios: tuple = (0.5, 1.0, 2.0)  # FPN Sec. 4.1 (h / w)
    anchor_offset: float = 0.0  # D2 ANCHOR_GENERATOR.OFFSET
    fg_iou: float = 0.7  # Faster R-CNN Sec. 3.1.2 / D2 RPN.IOU_THRESHOLDS
    bg_iou: float = 0.3
    batch_size_per_image: int = 256  # anchors sampled per image (D2)
    positive_fraction: float = 0.5
    box_reg_loss: str = "l1"  # D2 (SMOOTH_L1_BETA 0); D1/TV use smooth_l1 with beta 1/9
    smooth_l1_beta: float = 0.0
    pre_nms_topk_train: int = 2000  # per level (D2 Base-RCNN-FPN.yaml)
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 1000  # per image (D2 Base-RCNN-FPN.yaml; keypoints 1500, cascade 2000)
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7  # D2
    min_size: float = 0.0  # D2: drop proposals with a side <= 0
    head_conv_depth: int = 1  # 3x3 convs in the RPN head; TV maskrcnn_resnet50_fpn_v2 RPNHead(conv_depth=2)


@dataclass
class RoIHeadsConfig:
    num_classes: int = 80  # COCO; the trainer replaces it by the dataset's unless the config pins it
    fg_iou: float = 0.5  # Fast R-CNN Sec. 2.3 / D2 ROI_HEADS.IOU_THRESHOLDS
    batch_size_per_image: int = 512  # D2 ROI_HEADS.BATCH_SIZE_PER_IMAGE
    positive_fraction: float = 0.25  # D2
    append_gt: bool = True  # D2 PROPOSAL_APPEND_GT
    sampling_ratio: int = 0  # RoIAlign samples per bin; D2: 0 = adaptive ceil(roi / bin); D1/TV: 2
    aligned: bool = True  # D2 ROIAlignV2: half-pixel shift; D1/TV: False
    score_thresh: float = 0.05  # D2 ROI_HEADS.SCORE_THRESH_TEST
    nms_thresh: float = 0.5  # D2 ROI_HEADS.NMS_THRESH_TEST
    detections_per_image: int = 100  # COCO evaluates 100 detections per image


@dataclass
class BoxHeadConfig:
    conv_dims: tuple = (256, 256, 256, 256)  # 4conv1fc: every GN/SyncBN/scratch config (D2, D1, MMDet)
    fc_dims: tuple = (1024,)
    norm: str = "GN"  # D2 mask_rcnn_R_50_FPN_3x_gn.yaml: GN in the box-head convs, none on the fc
    resolution: int = 7  # RoIAlign output (Mask R-CNN Sec. 3)
    reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)  # D2 / D1 / TV BBOX_REG_WEIGHTS
    reg_loss: str = "l1"  # D2: L1; keypoint configs smooth_l1 with beta 0.5
    smooth_l1_beta: float = 0.0
    class_agnostic: bool = False  # D2 CLS_AGNOSTIC_BBOX_REG


@dataclass
class MaskHeadConfig:
    enabled: bool = True  # Mask R-CNN
    conv_dims: tuple = (256, 256, 256, 256)  # Mask R-CNN Fig. 4 (right) / D2 NUM_CONV 4
    norm: str = "GN"  # D2 mask_rcnn_R_50_FPN_3x_gn.yaml
    resolution: int = 14  # RoIAlign output; the deconv doubles it to 28 x 28 logits
    # At most this many foreground RoIs per image train the mask head, a uniform random subset; 0 = all of them
    # (the paper, D2, TV). Saves time where the mask head dominates the step, as in the CPU demo (BENCHMARKS.md).
    train_rois_per_image: int = 0


@dataclass
class KeypointHeadConfig:
    enabled: bool = False  # only the *_keypoint presets
    num_keypoints: int = 17  # COCO person keypoints
    conv_dims: tuple = (512,) * 8  # Mask R-CNN Sec. 5 / D2 ROI_KEYPOINT_HEAD.CONV_DIMS
    resolution: int = 14
    heatmap_size: int = 56  # deconv (28) then bilinear x2 (D2)
    loss_weight: float = 1.0  # D2 ROI_KEYPOINT_HEAD.LOSS_WEIGHT (the demo lowers it, see _DEMO)
    # Labels (1..K) whose detections get keypoints; () = every class, as in COCO's person-only keypoint models.
    # train.py and evaluate.py fill it from the categories that list keypoint names (persons among shapes in the demo).
    classes: tuple = ()


@dataclass
class CascadeConfig:
    enabled: bool = False  # Cascade R-CNN (Cai & Vasconcelos 2018), the paper's enhanced system
    ious: tuple = (0.5, 0.6, 0.7)  # D2 ROI_BOX_CASCADE_HEAD.IOUS
    reg_weights: tuple = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))  # D2


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    keypoint_head: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    # Pixel convention the backbone expects. Images enter the model as RGB floats in [0, 1]; the model multiplies
    # by pixel_scale, reorders channels to input_format, then subtracts pixel_mean and divides by pixel_std (both
    # given in input_format order). From scratch any fixed normalisation works; D2's 9x scratch configs use
    # BGR 0-255 with the MSRA mean and the ImageNet std. ImageNet init must match the weights (minimask/interop/imagenet.py).
    input_format: str = "BGR"
    pixel_scale: float = 255.0
    pixel_mean: tuple = (103.530, 116.280, 123.675)  # D2 PIXEL_MEAN
    pixel_std: tuple = (57.375, 57.120, 58.395)  # D2 scratch_mask_rcnn_R_50_FPN_9x_gn.yaml PIXEL_STD
    size_divisibility: int = 32  # pad so every FPN level (stride up to 32) tiles the image exactly (D2)
    # A process's batch is padded on canvases of this many images, like detectron2's per-GPU batch of 2 (16 images on
    # one canvas pad 14 % of it against 6 % at 2 on COCO images, benchmarks/bench_padding.py); losses are the mean
    # over canvases. 0 = the whole batch on one canvas.
    images_per_canvas: int = 2
    channels_last: bool = False  # NHWC weights and activations, same results; not faster on the 2-core CPU (demo)
    # torch.compile (inductor) of the backbone and FPN, in place (parameter names unchanged). Each new input shape
    # compiles first (minutes); at one fixed shape the demo model's training step is 1.4x faster on the 2-core CPU
    # after ~3 min of compiling (BENCHMARKS.md), so it pays on long runs with few distinct shapes.
    compile_backbone: bool = False
    # torchvision's arithmetic where it departs from detectron2's (anchors, RPN loss normaliser and ranking, small-box
    # filter, soft mask targets, mask paste, keypoint scores): minimask/interop/torchvision_conventions.py. For its checkpoints.
    torchvision_conventions: bool = False
    # Crowd / ignore annotations as regions that are neither positive nor negative: anchors and proposals covered
    # by one by more than this fraction of their own area leave the negatives (mmdetection MaxIoUAssigner
    # `ignore_iof_thr`, its default -1 = off; commonly 0.5 for pedestrians). Off in the COCO presets, where crowd
    # boxes are dropped as detectron2 does; the data then carries no `ignore_boxes`.
    ignore_iof_thr: float = -1.0


@dataclass
class InputConfig:
    min_size_train: tuple = (800,)  # Paper baseline: 800 only; its scale-augmented runs use 640..800 step 32
    max_size_train: int = 1333
    min_size_test: int = 800  # D2 / D1 test scale
    max_size_test: int = 1333
    horizontal_flip: bool = True  # the paper's only augmentation in the baseline
    # D2 INPUT.MASK_FORMAT: "polygon" rasterises COCO polygons inside each RoI (images whose masks are all polygons);
    # "bitmask" decodes full-image bitmaps (torchvision's loader; its soft mask targets need them)
    mask_format: str = "polygon"
    # Aligned frames stacked into the input (minimask.data.images.load_frames): ("visible",) RGB, ("thermal",)
    # 1 channel, ("visible", "thermal") 4; model.pixel_mean / pixel_std then need one value per channel
    modalities: tuple = ("visible",)


@dataclass
class DataConfig:
    train: str = "datasets/coco"  # a COCO root, annotation/image pairs, or "synthetic"
    num_workers: int = 4
    filter_empty: bool = True  # D2: images without usable annotations are dropped from training
    val: str = ""  # evaluation data, same forms as `train`; "" = the val split of `train`'s root
    train_subset: int = 0  # train on this many images chosen with the seed (`subset_indices`); 0 = all
    # Keypoint training leaves out images whose instances have fewer visible keypoints in all (D2
    # ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE); persons without keypoints still train boxes and masks
    min_keypoints_per_image: int = 1
    # Evaluations also report KAIST's log-average miss rate of the person class (minimask.miss_rate; "MR/<setting>"
    # in metrics.jsonl, lower is better); on by itself for datasets from the KAIST converter (minimask.data.kaist)
    miss_rate: bool = False


@dataclass
class SolverConfig:
    batch_size: int = 16  # global; Paper / D2: 8 GPUs x 2 images
    base_lr: float = 0.02  # at batch 16; scaled linearly with batch_size (Goyal et al. 2017)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # D2 WEIGHT_DECAY_NORM / D1 WEIGHT_DECAY_GN
    max_iter: int = 270_000  # 3x; the paper compares 2x..6x (LR x0.1 at the last 60k and 20k)
    steps: tuple = (210_000, 250_000)
    gamma: float = 0.1
    warmup_iters: int = 1000  # D2 linear warm-up
    warmup_factor: float = 0.001
    amp: bool = False  # the paper-era configs train in fp32
    lr: float = 0.0  # the learning rate actually used; 0 = base_lr scaled linearly to batch_size (train.py --lr)
    clip_grad_norm: float = 0.0  # max global gradient L2 norm; 0 = no clipping (D2 default: off)
    checkpoint_period: int = 5000
    keep_checkpoints: int = 3  # periodic checkpoints kept on disk (the newest ones); 0 = keep all
    eval_period: int = 10_000
    precise_bn_iters: int = 0  # D2 TEST.PRECISE_BN (on, 200 batches, in its SyncBN configs): BN statistics
    # recomputed over this many training batches before each evaluation; 0 = off, no effect without BatchNorm
    log_period: int = 20  # iterations between metrics.jsonl lines (D2 writes every 20)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Presets: name -> overrides of the defaults above (the defaults are the paper's R50-FPN GN model).

_FROZENBN_2FC = [
    "model.backbone.norm=FrozenBN", "model.backbone.freeze_at=2", "model.backbone.stride_in_1x1=True",
    "model.fpn.norm=", "model.box_head.conv_dims=()", "model.box_head.fc_dims=(1024, 1024)",
    "model.box_head.norm=", "model.mask_head.norm=", "model.pixel_std=(1.0, 1.0, 1.0)",
]  # the classic ImageNet fine-tuning baseline (D2 mask_rcnn_R_50_FPN_3x.yaml)
_SYNCBN = ["model.backbone.norm=SyncBN", "model.fpn.norm=SyncBN", "model.box_head.norm=SyncBN",
           "model.mask_head.norm=SyncBN", "solver.precise_bn_iters=200"]  # D2 scratch_..._9x_syncbn.yaml
_KEYPOINT = [
    "model.roi_heads.num_classes=1", "model.mask_head.enabled=False", "model.keypoint_head.enabled=True",
    "model.rpn.post_nms_topk_train=1500", "model.box_head.reg_loss=smooth_l1", "model.box_head.smooth_l1_beta=0.5",
]  # D2 Base-Keypoint-RCNN-FPN.yaml: person only, 1500 proposals, smooth-L1 0.5 (plain L1 hurts keypoint AP)
_TINY = [
    "model.backbone.depth=18", "model.backbone.norm=GN", "model.fpn.out_channels=64",
    "model.rpn.pre_nms_topk_train=300", "model.rpn.pre_nms_topk_test=300", "model.rpn.post_nms_topk_train=100",
    "model.rpn.post_nms_topk_test=100", "model.rpn.batch_size_per_image=64", "model.roi_heads.batch_size_per_image=64",
    "model.box_head.conv_dims=(64, 64)", "model.box_head.fc_dims=(128,)", "model.mask_head.conv_dims=(64, 64)",
    "model.keypoint_head.conv_dims=(64, 64)", "model.roi_heads.num_classes=3",
    "input.min_size_train=(128,)", "input.max_size_train=128", "input.min_size_test=128", "input.max_size_test=128",
    "data.train=synthetic", "data.num_workers=0", "solver.batch_size=2", "solver.base_lr=0.01",
    "solver.max_iter=300", "solver.steps=(200, 270)", "solver.warmup_iters=50", "solver.checkpoint_period=100",
    "solver.eval_period=100", "data.min_keypoints_per_image=0", "model.images_per_canvas=0",
]  # small widths for tests and the CPU demo: R18-FPN-64, 2-conv heads, 128 px inputs; on the synthetic set, images
# of shapes alone (no person, so no keypoint) train the box and mask heads of the keypoint models too, and the
# whole batch shares one canvas (4 synthetic images at 128-160 px pad 26 % of it, 2 pad 22 %: bench_padding.py)

_DEMO = _TINY + [
    "model.backbone.width_per_group=32", "model.roi_heads.num_classes=6",
    "model.rpn.anchor_sizes=(16, 32, 64, 128, 256)", "model.roi_heads.batch_size_per_image=128",
    "model.box_head.conv_dims=()", "model.box_head.fc_dims=(256, 256)", "model.mask_head.conv_dims=(64, 64, 64, 64)",
    "model.mask_head.train_rois_per_image=4", "model.keypoint_head.enabled=True", "model.keypoint_head.loss_weight=0.1",
    "input.min_size_train=(128, 160)", "input.max_size_train=256", "input.min_size_test=208", "input.max_size_test=320",
    "solver.batch_size=4", "solver.lr=0.04", "solver.max_iter=1800", "solver.steps=(1500, 1700)",
    "solver.warmup_iters=100", "solver.checkpoint_period=500", "solver.eval_period=0", "solver.clip_grad_norm=10.0",
]  # `python train.py --config demo`: boxes, masks and keypoints on the synthetic set, on a 2-core CPU in < 10 min.
# Chosen by measured AP per minute of CPU (BENCHMARKS.md): a half-width ResNet-18 (stem and res2 at 32 channels)
# trains 1.6x faster than the full one and, given the iterations that buys, ends higher; the 2fc box head is cheaper
# than the 2-conv one; the 4-conv mask head adds 2.6 mask AP; training it on 4 foreground RoIs per image instead of
# all of them (~28; on ~110 per batch it cost more than the backbone) makes a step 1.7x faster, and the iterations
# that buys raise box and mask AP by ~4; the keypoint head's loss at weight 1 swamps the others (gradient norm 5x
# theirs) and costs half the box AP, at 0.1 about 1 AP. Anchors halved: the synthetic objects (12-140 px, shrunk
# ~0.5x in training) are smaller than the FPN's 32-512 px anchors assume. LR 0.01 per image (8x the linear-scaling
# rule's) is the best of 0.005-0.02 per image measured for this short schedule; batch 4 gets 1.3x the images per
# second of batch 2 on two cores; 128-160 px training reaches more AP per minute than 160-192 px. LR x0.1 at 1,500
# and 1,700 rather than the 1x shape's 1,200 and 1,600: this short run gains from its long phase at the full LR
# (+3.5 mask AP, mean of two seeds; a cosine decay loses 2). Testing at 208 px
# rather than 192 adds 0.6-1.3 mask AP and 0.5-1.7 keypoint AP (box AP -0.4 to 0) on three trained demo models at
# no measurable cost; 200 / 216 / 224 px gain less mask AP (BENCHMARKS.md).

_PEDESTRIAN = [
    "model.roi_heads.num_classes=1", "model.mask_head.enabled=False", "model.rpn.aspect_ratios=(2.44,)",
    "model.rpn.anchor_sizes=(16, 32, 64, 128, 256)", "model.ignore_iof_thr=0.5", "data.miss_rate=True",
    "input.min_size_train=(512,)", "input.max_size_train=640", "input.min_size_test=512", "input.max_size_test=640",
    "solver.max_iter=30000", "solver.steps=(23000, 27000)",
]  # `pedestrian`: one upright class on 640 x 512 driving frames (KAIST), evaluated by its log-average miss rate.
# - person only, boxes only: KAIST and Caltech annotate boxes (the KAIST converter's box-shaped masks carry nothing)
# - one anchor shape, height / width 2.44: pedestrians are drawn at width 0.41 x height (Dollar et al., "Pedestrian
#   Detection: An Evaluation of the State of the Art", PAMI 2012, Sec. 2.2, the aspect ratio Caltech and KAIST
#   boxes are standardised to); Zhang et al., "Is Faster R-CNN Doing Well for Pedestrian Detection?" (ECCV 2016,
#   Sec. 3.1) use this single ratio for their RPN
# - anchors 16-256 (areas; a 32 anchor is 20 x 50 px): the Reasonable setting scores people from 55 px tall, and
#   most KAIST people are 50-200 px; the FPN's default 32-512 would leave the shortest without a fitting anchor
# - frames at their own size (shorter side 512, longer 640): resizing smaller costs the small people first
# - crowds (`people`), uncertain people (`person?`, `cyclist`) and out-of-protocol people are ignore regions, not
#   background (model.ignore_iof_thr 0.5); `python -m minimask.data.kaist --train` states which
# - 30k iterations at batch 16: about 19 passes over KAIST's 25,086 train-all-02 frames (as the paper, longer
#   from random init than fine-tuning would need); LR x0.1 at 23k and 27k
_TINY_PEDESTRIAN = _TINY + _PEDESTRIAN + [
    "model.backbone.width_per_group=32", "model.box_head.conv_dims=()", "model.box_head.fc_dims=(256, 256)",
    "input.min_size_train=(192,)", "input.max_size_train=240", "input.min_size_test=192", "input.max_size_test=240",
    "data.train=synthetic_kaist", "solver.batch_size=4", "solver.lr=0.02", "solver.max_iter=600",
    "solver.steps=(450, 550)", "solver.warmup_iters=50", "solver.clip_grad_norm=10.0", "solver.checkpoint_period=200",
]  # the pedestrian model at the CPU demo's widths, on the generated KAIST-layout miniature (README), 240 x 192

_TORCHVISION = [
    "model.torchvision_conventions=True", "model.backbone.norm=FrozenBN", "model.backbone.freeze_at=2",
    "model.fpn.norm=", "model.rpn.min_size=0.001", "model.rpn.post_nms_topk_train=2000",
    "model.rpn.box_reg_loss=smooth_l1", "model.rpn.smooth_l1_beta=0.1111111111111111", "model.roi_heads.num_classes=90",
    "model.roi_heads.sampling_ratio=2", "model.roi_heads.aligned=False", "model.box_head.conv_dims=()",
    "model.box_head.fc_dims=(1024, 1024)", "model.box_head.norm=", "model.box_head.reg_loss=smooth_l1",
    "model.box_head.smooth_l1_beta=0.1111111111111111", "model.mask_head.norm=", "model.input_format=RGB",
    "model.pixel_scale=1.0", "model.pixel_mean=(0.485, 0.456, 0.406)", "model.pixel_std=(0.229, 0.224, 0.225)",
    "input.mask_format=bitmask", "model.images_per_canvas=0",
]  # TV maskrcnn_resnet50_fpn with its weights: FrozenBN, trainable_backbone_layers=3 (= freeze_at 2), 2fc head,
# RoIAlign sampling 2 unaligned, smooth-L1 1/9, 91-slot COCO layout (labels 1..90 = COCO ids, N/A slots unused),
# bitmap masks and one canvas for the whole batch (its loader and GeneralizedRCNNTransform)
_TORCHVISION_V2 = _TORCHVISION + [
    "model.backbone.norm=BN", "model.backbone.freeze_norms=False", "model.fpn.norm=BN", "model.rpn.head_conv_depth=2",
    "model.box_head.conv_dims=(256, 256, 256, 256)", "model.box_head.fc_dims=(1024,)", "model.box_head.norm=BN",
    "model.mask_head.norm=BN",
]  # TV maskrcnn_resnet50_fpn_v2 (Li et al. 2021 "Benchmarking detection transfer learning with ViTs"): BatchNorm
# backbone / FPN / heads, 2-conv RPN head, 4conv1fc box head
_TORCHVISION_KEYPOINT = _TORCHVISION + [
    "model.roi_heads.num_classes=1", "model.mask_head.enabled=False", "model.keypoint_head.enabled=True",
    "input.min_size_train=(640, 672, 704, 736, 768, 800)",
]  # TV keypointrcnn_resnet50_fpn: person only, 17 keypoints

# detectron2 model-zoo presets, named d2_<config file name> (minimask/interop/detectron2_format.py loads their checkpoints).
# Inference follows minimask's defaults (= D2); these set what each yaml changes: norms, pixel std (1 unless the
# yaml sets the ImageNet std), stride_in_1x1, frozen stages, heads, and its multi-scale training sizes.
_D2_SIZES = ["input.min_size_train=(640, 672, 704, 736, 768, 800)"]  # D2 Base-RCNN-FPN.yaml
_D2_9X = ["solver.batch_size=64", "solver.base_lr=0.02", "solver.max_iter=202500", "solver.steps=(187500, 197500)",
          "solver.eval_period=2500"]  # D2 scratch_*_9x_*.yaml (4x the batch, 9x the epochs). Its BASE_LR 0.08 is
# the LR at its IMS_PER_BATCH 64; base_lr is given at batch 16 and scaled linearly (solver.training_lr): 0.08 again
_D2_FROZENBN = _FROZENBN_2FC + _D2_SIZES  # D2 mask_rcnn_R_50_FPN_3x.yaml: MSRA ImageNet init, FrozenBN, 2fc
_D2_GN = ["model.pixel_std=(1.0, 1.0, 1.0)"] + _D2_SIZES  # D2 mask_rcnn_R_50_FPN_3x_gn.yaml (std 1, as C2)
_D2_SYNCBN = _SYNCBN + _D2_SIZES  # D2 mask_rcnn_R_50_FPN_3x_syncbn.yaml
_D2_PRESETS = {
    "d2_mask_rcnn_R_50_FPN_3x": _D2_FROZENBN,
    "d2_mask_rcnn_R_101_FPN_3x": _D2_FROZENBN + ["model.backbone.depth=101"],
    "d2_faster_rcnn_R_50_FPN_3x": _D2_FROZENBN + ["model.mask_head.enabled=False"],
    "d2_faster_rcnn_R_101_FPN_3x": _D2_FROZENBN + ["model.mask_head.enabled=False", "model.backbone.depth=101"],
    "d2_keypoint_rcnn_R_50_FPN_3x": _D2_FROZENBN + _KEYPOINT,
    "d2_keypoint_rcnn_R_101_FPN_3x": _D2_FROZENBN + _KEYPOINT + ["model.backbone.depth=101"],
    "d2_cascade_mask_rcnn_R_50_FPN_3x": _D2_FROZENBN + [
        "model.cascade.enabled=True", "model.box_head.class_agnostic=True", "model.rpn.post_nms_topk_train=2000"],
    "d2_mask_rcnn_R_50_FPN_3x_gn": _D2_GN + ["model.backbone.freeze_at=2"],
    "d2_scratch_mask_rcnn_R_50_FPN_3x_gn": _D2_GN,  # FREEZE_AT 0, std still 1
    "d2_scratch_mask_rcnn_R_50_FPN_9x_gn": _D2_SIZES + _D2_9X,  # ImageNet std: minimask's defaults
    "d2_mask_rcnn_R_50_FPN_3x_syncbn": _D2_SYNCBN + [
        "model.backbone.stride_in_1x1=True", "model.backbone.freeze_at=2", "model.pixel_std=(1.0, 1.0, 1.0)"],
    "d2_scratch_mask_rcnn_R_50_FPN_9x_syncbn": _D2_SYNCBN + _D2_9X,
}

PRESETS: dict[str, list[str]] = {
    "r50_fpn_gn": [],
    "r101_fpn_gn": ["model.backbone.depth=101"],
    "x101_32x8d_fpn_gn": ["model.backbone.depth=101", "model.backbone.groups=32", "model.backbone.width_per_group=8"],
    "x152_32x8d_fpn_gn": ["model.backbone.depth=152", "model.backbone.groups=32", "model.backbone.width_per_group=8"],
    "r50_fpn_syncbn": _SYNCBN,
    "r50_fpn_frozenbn": _FROZENBN_2FC,
    "r50_fpn_gn_cascade": ["model.cascade.enabled=True", "model.box_head.class_agnostic=True",
                           "model.rpn.post_nms_topk_train=2000"],  # D2 cascade_mask_rcnn_R_50_FPN_3x.yaml
    "r50_fpn_gn_keypoint": _KEYPOINT + _D2_SIZES,  # D2 and D1 keypoint configs train at 640-800
    "r50_fpn_gn_box": ["model.mask_head.enabled=False"],  # Faster R-CNN
    "tiny": _TINY,
    "demo": _DEMO,
    "pedestrian": _PEDESTRIAN,
    "tiny_pedestrian": _TINY_PEDESTRIAN,
    "tiny_keypoint": _TINY + _KEYPOINT + ["model.keypoint_head.conv_dims=(64, 64)", "model.rpn.post_nms_topk_train=100"],
    "torchvision_maskrcnn_r50_fpn": _TORCHVISION,
    "torchvision_maskrcnn_r50_fpn_v2": _TORCHVISION_V2,
    "torchvision_keypointrcnn_r50_fpn": _TORCHVISION_KEYPOINT,
    **_D2_PRESETS,
}


# The detectron2 config file (under detectron2's configs/) that each preset follows. tests/test_presets.py checks
# every preset's effective training settings (the LR at its batch, schedule, warm-up, input sizes, sampling, losses)
# against its file, resolved through _BASE_ and detectron2's config/defaults.py; PRESET_DEVIATIONS are the only
# differences allowed, each with its reason.
PRESET_SOURCES = {
    "r50_fpn_gn": "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml",
    "r50_fpn_syncbn": "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml",  # its 3x schedule; trained from scratch here
    "r50_fpn_frozenbn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "r50_fpn_gn_cascade": "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml",
    "r50_fpn_gn_keypoint": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml",
    "d2_mask_rcnn_R_50_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "d2_mask_rcnn_R_101_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
    "d2_faster_rcnn_R_50_FPN_3x": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
    "d2_faster_rcnn_R_101_FPN_3x": "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
    "d2_keypoint_rcnn_R_50_FPN_3x": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml",
    "d2_keypoint_rcnn_R_101_FPN_3x": "COCO-Keypoints/keypoint_rcnn_R_101_FPN_3x.yaml",
    "d2_cascade_mask_rcnn_R_50_FPN_3x": "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml",
    "d2_mask_rcnn_R_50_FPN_3x_gn": "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml",
    "d2_scratch_mask_rcnn_R_50_FPN_3x_gn": "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml",
    "d2_scratch_mask_rcnn_R_50_FPN_9x_gn": "Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml",
    "d2_mask_rcnn_R_50_FPN_3x_syncbn": "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
    "d2_scratch_mask_rcnn_R_50_FPN_9x_syncbn": "Misc/scratch_mask_rcnn_R_50_FPN_9x_syncbn.yaml",
}
_SINGLE_SCALE = ("the paper's baseline trains at one scale, 800 px, with flips only (Sec. 4, Detectron's TRAIN.SCALES "
                 "(800,)); detectron2's files draw 640-800, the paper's scale-augmented setting")
PRESET_DEVIATIONS = {  # preset -> {config key: reason}
    "r50_fpn_gn": {"input.min_size_train": _SINGLE_SCALE},
    "r50_fpn_syncbn": {"input.min_size_train": _SINGLE_SCALE},
    "r50_fpn_frozenbn": {"input.min_size_train": _SINGLE_SCALE},
    "r50_fpn_gn_cascade": {"input.min_size_train": _SINGLE_SCALE},
}


def get_config(name: str = "r50_fpn_gn", overrides: typing.Iterable[str] = ()) -> Config:
    """A fresh Config for preset `name`, with "dotted.key=value" overrides applied in order on top of it.

    Values are parsed as Python literals and checked against the field's type: `model.backbone.depth=101`,
    `solver.steps=(480000, 520000)`, `model.fpn.norm=` (empty string). Unknown keys and wrong types raise
    ValueError naming the key.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = Config()
    for item in [*PRESETS[name], *overrides]:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """Set one "dotted.key=value" on cfg in place (see get_config)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            raise ValueError(f"unknown config key {key!r}")
        node = getattr(node, part)
    fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
    if leaf not in fields or dataclasses.is_dataclass(getattr(node, leaf)):
        raise ValueError(f"unknown config key {key!r}")
    setattr(node, leaf, _parse_value(key, text.strip(), getattr(node, leaf)))


def _parse_value(key: str, text: str, current):
    expected = type(current)
    if expected is str:
        return text
    if expected is tuple and current and all(isinstance(v, str) for v in current):
        # A tuple of names takes them bare: input.modalities=visible,thermal or =(thermal,)
        return tuple(w.strip().strip("'\"") for w in text.strip().strip("()").split(",") if w.strip())
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"config key {key!r} expects a {expected.__name__}, got {text!r}") from None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is tuple and isinstance(value, list):
        value = tuple(value)
    if expected is tuple and not isinstance(value, tuple):
        value = (value,)  # "input.min_size_train=800" means (800,)
    if type(value) is not expected:
        raise ValueError(f"config key {key!r} expects a {expected.__name__}, got {text!r}")
    return value


def to_dict(cfg: Config) -> dict:
    """The config as nested plain dicts (for printing and saving with a run)."""
    return dataclasses.asdict(copy.deepcopy(cfg))
