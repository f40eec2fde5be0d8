"""DATASETS.COCO_FORMAT: COCO-format datasets named in the config are registered in every
process that reads it (train_net's setup, the demo, the export tool); bad entries are named."""

import os
import subprocess
import sys
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from helpers import (
    REPO_ROOT,
    SHAPES_CONFIG,
    SMALL_SHAPES_OPTS,
    load_script,
    load_train_net,
    read_metrics,
)
from solo.data import register_builtin_datasets, register_coco_format_datasets
from solo.data.shapes import SHAPES_CATEGORIES, ShapesSplit, generate_shapes_split


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory):
    """A COCO-format folder as a user has one: annotations/instances_mine.json + mine/*.png."""
    root = tmp_path_factory.mktemp("custom")
    json_file = generate_shapes_split(
        str(root), ShapesSplit("mine", 4, seed=5, image_size=(64, 80))
    )
    return json_file, str(root / "mine")


def test_entries_are_registered_once_and_loadable(coco_folder):
    json_file, images = coco_folder
    assert register_coco_format_datasets([["reg_a", json_file, images]]) == ["reg_a"]
    # A second setup() in the same process is harmless.
    assert register_coco_format_datasets([("reg_a", json_file, images)]) == ["reg_a"]
    records = DatasetCatalog.get("reg_a")
    assert len(records) == 4 and records[0]["file_name"].startswith(images)
    expected = [c["name"] for c in sorted(SHAPES_CATEGORIES, key=lambda c: c["id"])]
    assert MetadataCatalog.get("reg_a").thing_classes == expected


@pytest.mark.parametrize(
    "entry, message",
    [
        (["reg_b", "missing.json", "."], "JSON file 'missing.json' does not exist"),
        (["reg_b", "{json}", "no/such/dir"], "image folder 'no/such/dir' does not exist"),
        (["reg_b", "{json}"], "not a [name, json_file, image_root] triple"),
        ("reg_b={json}:{images}", "not a [name, json_file, image_root] triple"),
        (["shapes_val", "{json}", "{images}"], "'shapes_val' is already registered"),
    ],
)
def test_bad_entries_are_named_with_the_fix(coco_folder, entry, message):
    json_file, images = coco_folder
    register_builtin_datasets()  # shapes_val: a name taken by another dataset
    if isinstance(entry, str):
        entry = entry.format(json=json_file, images=images)
    else:
        entry = [e.format(json=json_file, images=images) for e in entry]
    with pytest.raises(ValueError, match="DATASETS.COCO_FORMAT") as info:
        register_coco_format_datasets([entry])
    assert message in str(info.value)
    assert "reg_b" not in DatasetCatalog.list()


def test_one_command_trains_and_evaluates_a_coco_format_folder(coco_folder, tmp_path):
    """The README recipe: JSON + image folder on the command line, no Python wrapper."""
    json_file, images = coco_folder
    train_net = load_train_net()
    argv = ["--config-file", SHAPES_CONFIG, *SMALL_SHAPES_OPTS,
            "DATASETS.COCO_FORMAT", f"[['cmd_train', '{json_file}', '{images}'], "
            f"['cmd_val', '{json_file}', '{images}']]",
            "DATASETS.TRAIN", "('cmd_train',)", "DATASETS.TEST", "('cmd_val',)",
            "MODEL.SOLO.NUM_CLASSES", "3", "SOLVER.MAX_ITER", "2",
            "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    args = train_net.parse_command_line(argv)
    assert args.dist_url == "auto"
    train_net.main(args)  # trains, then evaluates on cmd_val (DefaultTrainer's final test)
    assert any("segm/AP" in record for record in read_metrics(str(tmp_path / "out")))
    # The saved config names the datasets: --eval-only with it alone registers them again.
    for name in ("cmd_train", "cmd_val"):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    saved = str(tmp_path / "out" / "config.yaml")
    weights = str(tmp_path / "out" / "model_final.pth")
    args = train_net.parse_command_line(
        ["--config-file", saved, "--eval-only", "MODEL.WEIGHTS", weights]
    )
    assert set(train_net.main(args)) == {"bbox", "segm"}  # one dataset: its results


def test_two_cpu_processes_both_register_the_datasets_of_the_command_line(coco_folder, tmp_path):
    """--num-gpus 2: each spawned worker runs setup() and registers DATASETS.COCO_FORMAT (a
    dataset registered only by the launching script is unknown to the workers); the default
    --dist-url auto finds a free port."""
    json_file, images = coco_folder
    cmd = [sys.executable, str(REPO_ROOT / "train_net.py"), "--num-gpus", "2"]
    cmd += ["--config-file", str(REPO_ROOT / SHAPES_CONFIG), *SMALL_SHAPES_OPTS]
    cmd += ["DATASETS.COCO_FORMAT", f"[['ddp_train', '{json_file}', '{images}']]"]
    cmd += ["DATASETS.TRAIN", "('ddp_train',)", "MODEL.SOLO.NUM_CLASSES", "3"]
    cmd += ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "ddp")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dist_url='auto'" in proc.stdout
    assert (tmp_path / "ddp" / "model_final.pth").is_file()


@pytest.mark.parametrize("script", ["demo/demo.py", "tools/export_model.py"])
def test_demo_and_export_tool_register_the_datasets_of_their_config(script, tmp_path, capsys):
    """Both read DATASETS.COCO_FORMAT before building a model: a missing JSON is named."""
    tool = load_script(script, "register_" + script.replace("/", "_").replace(".py", ""))
    argv = ["--config-file", str(REPO_ROOT / SHAPES_CONFIG)]
    argv += ["--input", str(tmp_path)] if script.startswith("demo") else ["--output", str(tmp_path)]
    argv += ["DATASETS.COCO_FORMAT", "[['tool_val', 'no/such.json', '.']]"]
    argv += ["DATASETS.TEST", "('tool_val',)", "MODEL.WEIGHTS", str(tmp_path / "m.pth")]
    (tmp_path / "a.png").write_bytes(b"")  # inputs and weights are checked first: exist
    (tmp_path / "m.pth").write_bytes(b"")
    with pytest.raises((SystemExit, ValueError)) as info:
        tool.main(argv)
    message = str(info.value) + capsys.readouterr().err
    assert (
        "DATASETS.COCO_FORMAT: dataset 'tool_val': JSON file 'no/such.json' does not exist"
        in message
    )
