"""``--resume`` with a config whose solver differs from the checkpoint's: what can be applied
(learning rates, weight decays, momentum) is, with a warning; what cannot (another optimizer,
other parameter groups, fewer iterations than trained) stops before the first iteration with a
:class:`~solo.engine.checks.RunConfigError` naming the keys and the way out."""

from typing import Dict, List, Sequence, Tuple

from .checks import RunConfigError

__all__ = ["compare_resumed_solver", "describe_changes"]


# Optimizer hyper-parameters that can be changed on resume (the new value is applied), and the
# config keys they come from.
APPLICABLE = {
    "initial_lr": "SOLVER.BASE_LR / BIAS_LR_FACTOR",
    "weight_decay": "SOLVER.WEIGHT_DECAY / WEIGHT_DECAY_NORM / WEIGHT_DECAY_BIAS",
    "momentum": "SOLVER.MOMENTUM",
    "nesterov": "SOLVER.NESTEROV",
}
WAY_OUT = (
    "To start a new schedule from these weights, pass MODEL.WEIGHTS {checkpoint} without "
    "--resume (and another OUTPUT_DIR); to continue the run, resume with the solver it was "
    "started with."
)


def _optimizer_name(groups: Sequence[dict]) -> str:
    if groups and "betas" in groups[0]:
        return "ADAMW"
    return "SGD" if groups and "momentum" in groups[0] else "unknown"


def compare_resumed_solver(
    saved_groups: Sequence[dict],
    new_groups: Sequence[dict],
    saved_iteration: int,
    max_iter: int,
    checkpoint: str,
) -> List[Tuple[int, str, object, object]]:
    """Compare the optimizer parameter groups of a checkpoint with those built from the config.

    Args:
        saved_groups, new_groups: ``optimizer.state_dict()["param_groups"]`` of the checkpoint
            and of the freshly built optimizer (its LR scheduler already attached, so each group
            has ``initial_lr``).
        saved_iteration: the checkpoint's last trained iteration; ``max_iter``: SOLVER.MAX_ITER.
        checkpoint: the checkpoint's path, for the message.

    Returns:
        ``(group index, hyper-parameter, checkpoint value, config value)`` for every
        hyper-parameter of :data:`APPLICABLE` that differs: the caller applies the config value.

    Raises:
        RunConfigError: when the checkpoint cannot continue under this config: another
            ``SOLVER.OPTIMIZER`` (its state has other buffers), other parameter groups
            (``BIAS_LR_FACTOR``, ``WEIGHT_DECAY_NORM``/``BIAS`` or frozen stages changed how
            parameters are grouped), or ``SOLVER.MAX_ITER`` below the trained iterations.
    """
    way_out = WAY_OUT.format(checkpoint=checkpoint)
    trained = saved_iteration + 1
    if max_iter < trained:
        raise RunConfigError(
            f"--resume: the checkpoint '{checkpoint}' has already trained {trained} iterations, "
            f"more than SOLVER.MAX_ITER={max_iter}: nothing would be trained. Raise "
            f"SOLVER.MAX_ITER to train longer, or evaluate it with --eval-only MODEL.WEIGHTS "
            f"{checkpoint}."
        )
    saved_name, new_name = _optimizer_name(saved_groups), _optimizer_name(new_groups)
    if saved_name != new_name:
        raise RunConfigError(
            f"--resume: the checkpoint was trained with SOLVER.OPTIMIZER {saved_name}, the "
            f"config asks for {new_name}; the optimizer state cannot be carried over. {way_out}"
        )
    saved_sizes = [len(g["params"]) for g in saved_groups]
    new_sizes = [len(g["params"]) for g in new_groups]
    if saved_sizes != new_sizes:
        raise RunConfigError(
            f"--resume: the optimizer's parameter groups differ from the checkpoint's "
            f"({len(saved_sizes)} groups of {saved_sizes} parameters vs {len(new_sizes)} of "
            f"{new_sizes} now): SOLVER.BIAS_LR_FACTOR, WEIGHT_DECAY_BIAS, WEIGHT_DECAY_NORM or "
            f"MODEL.BACKBONE.FREEZE_AT changed. {way_out}"
        )
    changes = []
    for index, (saved, new) in enumerate(zip(saved_groups, new_groups)):
        for key in APPLICABLE:
            if key in new and saved.get(key) != new[key]:
                changes.append((index, key, saved.get(key), new[key]))
    return changes


def describe_changes(changes: Sequence[Tuple[int, str, object, object]]) -> str:
    """One line per changed hyper-parameter, distinct values only."""
    summary: Dict[Tuple[str, object, object], int] = {}
    for _, key, old, new in changes:
        summary[(key, old, new)] = summary.get((key, old, new), 0) + 1
    return "; ".join(
        f"{APPLICABLE[key]}: {key} {old} -> {new} ({count} parameter groups)"
        for (key, old, new), count in summary.items()
    )
