"""The two initialisations of Detectron's convolutions and fully connected layers (fvcore `nn/weight_init.py`), used
when training from random init ("Rethinking ImageNet Pre-training", Sec. 3: the init of each layer matters less
with normalisation, but it is Detectron's that the paper trains from)."""
from torch import nn


def c2_msra_fill(module: nn.Module) -> None:
    """Caffe2's "MSRAFill": He-normal with fan_out (He et al. 2015), zero bias. For convs and deconvs followed by a
    ReLU (the backbone, the box, mask and keypoint heads)."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's "XavierFill": uniform in +-sqrt(3 / fan_in) (kaiming_uniform with a=1), zero bias. For the FPN's
    convs and the box head's fully connected layers."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
