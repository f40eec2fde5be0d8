"""Every ```python block of README.md and docs/*.md runs, as written, on a machine without CUDA.

The convention, for whoever writes documentation:

* Each block runs in a fresh namespace (``__name__ == "__main__"``), in a scratch working
  directory that holds what a reader has after ``make setup`` and ``make demo``: ``configs/``
  (this repository's), the shapes model at ``output/shapes/SOLOv2_R18/model_final.pth`` (here a
  seeded model whose every grid cell is a confident candidate, so that predictions exist) and
  the built-in shapes datasets (generated on first use, as for a reader). Write snippets
  against those paths and they are tested as they stand.
* ``torch.cuda.is_available()`` is False while a block runs: what the README promises on a
  CPU-only machine is what is checked, also on a GPU machine.
* A block that cannot run here (it needs COCO, a GPU, a downloaded file) is preceded by the
  line ``<!-- doctest: skip (the reason) -->``; the reason is shown in the test report.
* Blocks of other languages (```bash, ```yaml) are not run.
"""

import re
import sys
from pathlib import Path
import pytest
import torch

from helpers import REPO_ROOT, build, force_candidates, shapes_cache, solo_cfg

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*doctest:\s*skip\s*(.*?)\s*-->")
SHAPES_WEIGHTS = "output/shapes/SOLOv2_R18/model_final.pth"


def python_blocks(path: Path):
    """``(first line number, code, skip reason or None)`` of each ```python block of ``path``."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            previous = next((x for x in reversed(lines[: start - 1]) if x.strip()), "")
            match = SKIP.search(previous)
            reason = (match.group(1).strip("() ") or "no reason given") if match else None
            blocks.append((start + 1, "\n".join(body) + "\n", reason))
        i += 1
    return blocks


BLOCKS = [
    pytest.param(path, line, code, reason, id=f"{path.relative_to(REPO_ROOT)}:{line}")
    for path in DOC_FILES
    for line, code, reason in python_blocks(path)
]


@pytest.fixture(scope="module")
def reader_directory(tmp_path_factory):
    """A working directory as a reader's checkout has it after ``make demo``."""
    root = tmp_path_factory.mktemp("reader")
    (root / "configs").symlink_to(REPO_ROOT / "configs", target_is_directory=True)
    model = build(solo_cfg("Shapes/SOLOv2_R18.yaml"), seed=0)
    force_candidates(model)
    weights = root / SHAPES_WEIGHTS
    weights.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, weights)
    with shapes_cache(root / "datasets" / "shapes"):
        yield root


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_docs_have_python_blocks_to_run():
    assert sum(1 for p in BLOCKS if p.values[3] is None) >= 2


@pytest.mark.parametrize("path, line, code, reason", BLOCKS)
def test_doc_block_runs_as_written_on_cpu(
    path, line, code, reason, reader_directory, cpu_only, monkeypatch, capsys
):
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.chdir(reader_directory)
    monkeypatch.setattr(sys, "argv", [f"{path.name}:{line}"])
    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    exec(compile(code, f"{path}:{line}", "exec"), namespace)  # noqa: S102 (the docs are ours)


def test_detectron2_config_idiom_predicts_on_a_cpu_only_machine(reader_directory, cpu_only):
    """The README's old snippet: get_cfg() + add_solo_config() + DefaultPredictor crashed with
    "Found no NVIDIA driver" (MODEL.DEVICE "cuda") on a machine without CUDA."""
    import numpy as np

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    import solo

    cfg = get_cfg()
    solo.add_solo_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs/Shapes/SOLOv2_R18.yaml"))
    cfg.MODEL.WEIGHTS = str(reader_directory / SHAPES_WEIGHTS)
    assert cfg.MODEL.DEVICE == "cpu"
    instances = DefaultPredictor(cfg)(np.full((96, 120, 3), 128, np.uint8))["instances"]
    assert instances.pred_masks.device.type == "cpu" and len(instances) > 0


def test_a_block_marked_skip_is_reported_with_its_reason(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n```python\nx = 1\n```\n\n<!-- doctest: skip (needs COCO) -->\n"
        "```python\nraise SystemExit\n```\n```bash\nexit 1\n```\n"
    )
    assert python_blocks(doc) == [(3, "x = 1\n", None), (8, "raise SystemExit\n", "needs COCO")]


def test_reader_directory_holds_what_make_demo_leaves(reader_directory):
    assert (reader_directory / SHAPES_WEIGHTS).is_file()
    assert (reader_directory / "configs" / "Shapes" / "SOLOv2_R18.yaml").is_file()
