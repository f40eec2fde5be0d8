"""Hooks SOLO's trainer adds to Detectron2's defaults."""

from detectron2.engine import hooks

__all__ = ["WRITER_PERIOD", "WriteAfterEvaluation"]

# The period of the PeriodicWriter that DefaultTrainer.build_hooks adds (fixed there).
WRITER_PERIOD = 20


class WriteAfterEvaluation(hooks.HookBase):
    """Runs the metric writers right after an evaluation that the periodic writer would not
    write: writers record each scalar's latest value only, so with ``TEST.EVAL_PERIOD`` shorter
    than the writer period, an evaluation's results were overwritten by the next one before
    they reached ``metrics.json`` and TensorBoard. Add it after the writer hook."""

    def __init__(self, writers, eval_period: int, writer_period: int = WRITER_PERIOD):
        self._writers = writers
        self._eval_period = eval_period
        self._writer_period = writer_period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        evaluated = self._eval_period > 0 and next_iter % self._eval_period == 0
        written = next_iter % self._writer_period == 0 or next_iter == self.trainer.max_iter
        if evaluated and not written:
            for writer in self._writers:
                writer.write()
