"""Building configs: misspelled keys are named with the keys that exist."""

import pytest

from helpers import CONFIG_DIR
from solo import get_solo_cfg
from solo.config import UnknownConfigKeyError

SHAPES = str(CONFIG_DIR / "Shapes/SOLOv2_R18.yaml")


@pytest.mark.parametrize(
    "key, suggested",
    [("MODEL.SOLO.NUM_CLASES", "MODEL.SOLO.NUM_CLASSES"), ("SOLVER.BASE_LRR", "SOLVER.BASE_LR")],
)
def test_misspelled_override_is_named_with_the_closest_keys(key, suggested):
    with pytest.raises(UnknownConfigKeyError) as info:
        get_solo_cfg(SHAPES, [key, "3"])
    assert str(info.value).startswith(f"Unknown config key {key} ")
    assert f"Did you mean {suggested}" in str(info.value)


def test_misspelled_key_in_a_config_file_is_named_with_the_file(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(f"_BASE_: {SHAPES}\nMODEL:\n  SOLO:\n    SCORE_TRESH: 0.2\n")
    with pytest.raises(UnknownConfigKeyError, match=r"SCORE_TRESH \(in config file .*mine.yaml"):
        get_solo_cfg(str(config))


def test_renamed_keys_keep_their_own_message():
    with pytest.raises(KeyError, match="renamed to TEST.DETECTIONS_PER_IMAGE") as info:
        get_solo_cfg(SHAPES, ["MODEL.SOLO.MAX_PER_IMAGE", "10"])
    assert not isinstance(info.value, UnknownConfigKeyError)
