"""A missing ImageNet backbone file that the COCO configs name is reported with the commands that
make it (download + tools/convert_checkpoint.py --source torchvision)."""

import pytest

from helpers import solo_cfg
from solo.engine.checks import RunConfigError, check_weights_file


@pytest.mark.parametrize(
    "config, model",
    [("SOLOv2/R50_3x.yaml", "resnet50"), ("SOLO/R101_3x.yaml", "resnet101")],
)
def test_missing_torchvision_weights_name_the_download_and_the_conversion(config, model, tmp_path):
    cfg = solo_cfg(config)
    weights = str(tmp_path / f"checkpoints/torchvision-R-{model[6:]}.pkl")
    cfg.MODEL.WEIGHTS = weights
    with pytest.raises(RunConfigError) as info:
        check_weights_file(cfg)
    message = str(info.value)
    assert f"MODEL.WEIGHTS '{weights}' does not exist" in message
    assert f"https://download.pytorch.org/models/{model}-" in message
    assert "tools/convert_checkpoint.py --source torchvision" in message and weights in message


def test_other_missing_weights_keep_the_short_message(tmp_path):
    cfg = solo_cfg("SOLOv2/R50_3x.yaml")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    with pytest.raises(RunConfigError, match=r"model_final.pth' does not exist\.$"):
        check_weights_file(cfg)


def test_weights_that_name_a_directory_are_refused_naming_a_file_in_it(tmp_path):
    cfg = solo_cfg("SOLOv2/R50_3x.yaml")
    cfg.MODEL.WEIGHTS = str(tmp_path)
    with pytest.raises(
        RunConfigError, match=r"is a directory: give a file in it \(it holds none\)"
    ):
        check_weights_file(cfg)
    (tmp_path / "model_final.pth").write_bytes(b"")
    with pytest.raises(RunConfigError, match=r"is a directory: .*e\.g\. .*model_final\.pth\."):
        check_weights_file(cfg)


def test_a_file_that_is_not_a_checkpoint_is_named_instead_of_a_torch_traceback(tmp_path):
    from solo.checkpoint import CheckpointMismatchError, build_inference_model

    text = tmp_path / "notes.png"
    text.write_text("hello")
    cfg = solo_cfg("Shapes/SOLOv2_R18.yaml", ["MODEL.WEIGHTS", str(text)])
    with pytest.raises(CheckpointMismatchError, match=r"notes.png' is not a checkpoint .*\.pth"):
        build_inference_model(cfg)
