"""Weights from elsewhere: reading weight files safely (`weight_files.py`), ImageNet backbones in torchvision,
Caffe2 and minimask formats (`imagenet.py`), torchvision's and detectron2's detection checkpoints
(`torchvision_format.py`, `detectron2_format.py`, and `torchvision_conventions.py` for the arithmetic torchvision's
models need), and `from_checkpoint`, which builds the model a file needs (`model_zoo.py`)."""
