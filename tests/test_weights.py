"""minimask.weights: initial weights for training (ImageNet backbone, whole-detector checkpoint)."""
import pytest
import torch

import minimask
from minimask.weights import load_initial_weights


def test_imagenet_init_loads_the_backbone_and_reports(tmp_path, capsys):
    cfg = minimask.get_config("tiny")
    source = minimask.build_model(cfg).backbone.state_dict()
    source["extra.weight"] = torch.zeros(1)  # e.g. an ImageNet classifier the detector has no place for
    torch.save(source, tmp_path / "imagenet.pth")
    model = minimask.build_model(cfg)
    load_initial_weights(model, "imagenet", str(tmp_path / "imagenet.pth"))
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, source[name]), name
    assert "1 unexpected keys ['extra.weight']" in capsys.readouterr().out
    torch.save({"model": {"nonsense": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_initial_weights(model, "checkpoint", str(tmp_path / "bad.pth"))
