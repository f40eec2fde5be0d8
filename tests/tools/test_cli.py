"""One command-line convention for every script (solo.utils.cli): config overrides are KEY VALUE
pairs after the flags, the older ``--opts`` spelling is still accepted, mistakes are named;
train_net picks a free port by default and warns when CPU processes outnumber the cores."""

import argparse
import logging
import os
import subprocess
import sys
import warnings
import pytest

from helpers import REPO_ROOT, capture_warnings, load_script
from solo.utils import cli

OVERRIDES = ["MODEL.WEIGHTS", "m.pth", "OUTPUT_DIR", "out", "DATASETS.TEST", "('a',)"]


def test_overrides_start_at_the_first_config_key_or_after_opts():
    flags = ["--config-file", "c.yaml", "--input", "a.png", "b.png"]
    assert cli.split_opts(flags + OVERRIDES) == (flags, OVERRIDES)
    assert cli.split_opts(flags + ["--opts"] + OVERRIDES) == (flags, OVERRIDES)
    assert cli.split_opts(flags) == (flags, [])
    # File names and lowercase words are not keys; values may look like anything.
    for token in ("model.pth", "MODEL", "Model.WEIGHTS", "FOO.BAR", "MODEL..X"):
        assert not cli.is_config_key(token)
    assert cli.is_config_key("OUTPUT_DIR") and cli.is_config_key("MODEL.RESNETS.RES2_OUT_CHANNELS")


def parser_with_input():
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--input", nargs="+")
    cli.add_opts_argument(parser)
    return parser


def test_a_flag_with_several_values_does_not_swallow_the_overrides():
    args = cli.parse_args(parser_with_input(), ["--input", "a.png", "b.png", *OVERRIDES])
    assert args.input == ["a.png", "b.png"] and args.opts == OVERRIDES


@pytest.mark.parametrize(
    "argv, message",
    [
        (["MODEL.WEIGHTS", "m.pth", "MODEL.DEVICE"], "'MODEL.DEVICE' has no value"),
        (["MODEL.WEIGHTS", "m.pth", "--input", "a.png"], "flag --input after the config"),
        (["--opts", "MODEL.WEIGHTS", "m", "--opts", "X", "y"], "flag --opts after the config"),
    ],
)
def test_malformed_overrides_exit_naming_the_token(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(parser_with_input(), argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


SCRIPTS = {
    "train_net.py": ["--config-file", "c.yaml", "--eval-only"],
    "demo/demo.py": ["--config-file", "c.yaml", "--input", "a.png", "b.png"],
    "tools/export_model.py": ["--config-file", "c.yaml", "--output", "exported"],
    "tools/benchmark.py": ["--config-file", "c.yaml", "--task", "inference"],
    "tools/convert_checkpoint.py": ["--source", "solo", "--config", "c.yaml", "src.pth", "d.pth"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("spelling", ["positional", "--opts"])
def test_every_script_takes_overrides_both_ways(script, spelling):
    module = load_script(script, "cli_" + script.replace("/", "_").replace(".py", ""))
    flags = SCRIPTS[script]
    argv = flags + (["--opts"] if spelling == "--opts" else []) + OVERRIDES
    if script == "train_net.py":
        args = module.parse_command_line(argv)
    else:
        args = cli.parse_args(module.get_parser(), argv)
    assert args.opts == OVERRIDES
    assert (args.config_file if hasattr(args, "config_file") else args.config) == "c.yaml"


def test_train_net_uses_a_free_port_unless_given():
    train_net = load_script("train_net.py", "cli_train_net_port")
    assert train_net.parse_command_line(["--config-file", "c.yaml"]).dist_url == "auto"
    url = "tcp://10.0.0.1:1234"
    assert train_net.parse_command_line(["--dist-url", url, "--config-file", "c"]).dist_url == url


def test_several_machines_need_an_address_and_cpu_oversubscription_is_said(caplog, monkeypatch):
    with pytest.raises(SystemExit, match="--num-machines 2 needs --dist-url tcp://"):
        cli.check_processes(1, 2, "auto", cuda=True)
    monkeypatch.setattr(cli, "available_cores", lambda: 2)
    with capture_warnings(caplog, cli.__name__):
        cli.check_processes(2, 1, "auto", cuda=False)  # as many processes as cores: quiet
        assert caplog.text == ""
        cli.check_processes(8, 1, "auto", cuda=True)  # GPUs: one process per GPU, not cores
        assert caplog.text == ""
        cli.check_processes(8, 1, "auto", cuda=False)
    assert "--num-gpus 8 without CUDA starts 8 CPU processes on 2 cores" in caplog.text
    assert {r.levelno for r in caplog.records} == {logging.WARNING}


def test_known_startup_warnings_are_hidden_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.filter_known_warnings()
        for message, category, module in cli.KNOWN_WARNINGS:
            text = message.replace("\\", "")
            warnings.warn_explicit(text, category, "f.py", 1, module=module.replace("\\", ""))
        warnings.warn_explicit("`torch.jit.script` is deprecated", FutureWarning, "f.py", 1,
                               module="mine")  # fmt: skip
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == [
        "`torch.jit.script` is deprecated",
        "something else",
    ]


def test_train_net_starts_without_known_warnings():
    """Importing detectron2.modeling / fvcore.nn printed torch.jit.script deprecations twice."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_net.py"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


def test_the_demo_names_a_missing_webcam():
    demo = load_script("demo/demo.py", "cli_demo_webcam")
    if any(os.path.exists(f"/dev/video{i}") for i in range(4)):
        pytest.skip("this machine has a video device")
    with pytest.raises(demo.DemoError, match="cannot open the webcam"):
        demo.open_capture(None)
