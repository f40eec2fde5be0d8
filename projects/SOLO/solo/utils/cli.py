"""The command-line conventions shared by ``train_net.py``, ``demo/demo.py`` and ``tools/``.

* Config overrides are Detectron2's positional ``opts``: ``KEY VALUE`` pairs after the flags
  (``... --eval-only MODEL.WEIGHTS model.pth``). The older ``--opts KEY VALUE`` spelling of the
  demo, benchmark and converter is still accepted. :func:`parse_args` splits them off before
  ``argparse`` sees the flags, so a flag taking several values (``--input a.png b.png``) cannot
  swallow them.
* Multi-process runs: ``--dist-url auto`` (a free local port) unless one is given, an error when
  several machines have no address, a warning when CPU processes outnumber the cores.
* :func:`filter_known_warnings`: start-up warnings a user cannot act on (``torch.jit.script``
  deprecation printed while Detectron2 and fvcore are imported, a read-only numpy array in
  Detectron2's mask stacking) are hidden; every other warning is shown as before.
"""

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "OPTS_HELP",
    "add_opts_argument",
    "check_processes",
    "filter_known_warnings",
    "parse_args",
    "split_opts",
    "use_free_port_by_default",
]

logger = logging.getLogger(__name__)

# Top level of Detectron2's config (get_cfg()): nodes, whose keys have a dot, and leaves.
CONFIG_NODES = ("DATALOADER", "DATASETS", "GLOBAL", "INPUT", "MODEL", "SOLVER", "TEST")
CONFIG_LEAVES = ("CUDNN_BENCHMARK", "OUTPUT_DIR", "SEED", "VERSION", "VIS_PERIOD")
LEGACY_OPTS_FLAG = "--opts"
OPTS_HELP = (
    "config overrides as KEY VALUE pairs after the flags, e.g. MODEL.WEIGHTS model.pth "
    "(the older spelling '--opts KEY VALUE ...' is also accepted)"
)

# (message regex, category, module regex) of warnings printed by code the user does not own.
KNOWN_WARNINGS = (
    # detectron2.modeling.box_regression and fvcore.nn.focal_loss call torch.jit.script at import.
    (r"`torch\.jit\.script` is deprecated", FutureWarning, r"torch\.jit\._script"),
    # detectron2.data.detection_utils stacks read-only mask arrays (it copies them first).
    (r"The given NumPy array is not writable", UserWarning, r"detectron2\.data\.detection_utils"),
)


def filter_known_warnings() -> None:
    """Hide :data:`KNOWN_WARNINGS` (and only them) in this process; idempotent. Spawned
    processes (``--num-gpus``) run it again when they import ``solo``."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def is_config_key(token: str) -> bool:
    """Whether a command-line token is a config key (``MODEL.WEIGHTS``, ``OUTPUT_DIR``)."""
    if token in CONFIG_LEAVES:
        return True
    parts = token.split(".")
    return len(parts) > 1 and parts[0] in CONFIG_NODES and token == token.upper() and all(parts)


def split_opts(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split a command line into ``(flags, opts)``.

    The overrides start at ``--opts`` (the older spelling, dropped) or at the first config key
    (:func:`is_config_key`); everything from there on is an override.
    """
    argv = list(argv)
    for i, token in enumerate(argv):
        if token == LEGACY_OPTS_FLAG:
            return argv[:i], argv[i + 1 :]
        if is_config_key(token):
            return argv[:i], argv[i:]
    return argv, []


def add_opts_argument(parser: argparse.ArgumentParser) -> None:
    """Declare the positional ``opts`` (for ``--help``; :func:`parse_args` fills it)."""
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE", help=OPTS_HELP
    )


def parse_args(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
) -> argparse.Namespace:
    """``parser.parse_args`` with the overrides split off first (:func:`split_opts`).

    ``args.opts`` is the list of overrides. A flag written after the overrides, a stray
    ``--opts`` among them and an odd number of tokens exit through ``parser.error`` (status 2),
    naming the token: Detectron2 would stop later with "Override list has odd length".
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, opts = split_opts(argv)
    args = parser.parse_args(flags)
    opts = list(getattr(args, "opts", None) or []) + opts
    for key in opts[::2]:
        if key.startswith("--"):
            where = f"after the config overrides {opts}"
            parser.error(f"flag {key} {where}: write flags first, then KEY VALUE pairs.")
    if len(opts) % 2:
        parser.error(
            f"config overrides come in KEY VALUE pairs; got {len(opts)} tokens {opts} "
            f"('{opts[-1]}' has no value)."
        )
    args.opts = opts
    return args


def use_free_port_by_default(parser: argparse.ArgumentParser) -> None:
    """Make ``--dist-url`` of Detectron2's ``default_argument_parser`` default to ``auto``
    (a free port on this machine) instead of a fixed port per user, which a second run on the
    same machine finds taken (``EADDRINUSE``). A ``--dist-url`` given is used as is."""
    parser.set_defaults(dist_url="auto")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_processes(num_gpus: int, num_machines: int, dist_url: str, cuda: bool) -> None:
    """Refuse a launch that cannot start, and warn about one that will crawl.

    Raises:
        SystemExit: several machines with ``--dist-url auto`` (each would pick its own port).

    Without CUDA, ``--num-gpus N`` starts N CPU processes that share the machine's cores: more
    processes than cores trains slower than one process, so that is said before they start.
    """
    if num_machines > 1 and dist_url == "auto":
        raise SystemExit(
            f"--num-machines {num_machines} needs --dist-url tcp://<address of machine 0>:<port>, "
            "the same on every machine ('auto' picks a port on this machine only)."
        )
    cores = available_cores()
    if not cuda and num_gpus > 1 and num_gpus > cores:
        logger.warning(
            f"--num-gpus {num_gpus} without CUDA starts {num_gpus} CPU processes on "
            f"{cores} cores: each gets a fraction of a core and the run is slower than with "
            f"--num-gpus {max(1, cores)} (or 1, which also keeps the batch in one process)."
        )
