"""Detection ops written in torch ops, with torchvision.ops-compatible signatures."""
from minimask.ops.boxes import batched_nms, box_area, box_iou, clip_boxes_to_image, nms, remove_small_boxes
from minimask.ops.roi_align import roi_align

__all__ = ["batched_nms", "box_area", "box_iou", "clip_boxes_to_image", "nms", "remove_small_boxes", "roi_align"]
