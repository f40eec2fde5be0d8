"""Mixed precision on CPU: ``SOLVER.AMP.ENABLED`` with ``MODEL.DEVICE cpu``.

Detectron2's ``AMPTrainer`` is CUDA-only (float16 with a gradient scaler). On a CPU with native
bfloat16 (AVX512-BF16 or AMX), oneDNN runs bfloat16 convolutions much faster than float32
(figures: docs/benchmarks_notes.md). bfloat16 keeps float32's
exponent range, so no gradient scaler is needed. Weights, gradients and optimizer state stay
float32; the losses are computed in float32 (see ``solo.losses``) and the targets outside
autocast (``SOLO.losses``).
"""

import logging
import time
import torch

from detectron2.engine import SimpleTrainer

logger = logging.getLogger(__name__)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware; without it oneDNN emulates bfloat16,
    slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass (model and losses) runs under CPU autocast to
    bfloat16; backward and the optimizer step run outside autocast, as PyTorch recommends.

    Takes ``SimpleTrainer``'s arguments; ``run_step`` is ``SimpleTrainer.run_step`` with the
    forward pass under autocast (Detectron2 has no hook around the forward pass alone), honouring
    ``zero_grad_before_forward`` and ``async_write_metrics`` as it does.
    """

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def trainer_for_cpu_amp(trainer: SimpleTrainer) -> SimpleTrainer:
    """What ``SOLVER.AMP.ENABLED`` means for a CPU model: ``trainer`` (the ``AMPTrainer`` that
    ``DefaultTrainer`` built, CUDA-only) is replaced by the bfloat16 trainer, or by plain float32
    training (with a warning) where the CPU has no native bfloat16. Same model, data loader,
    optimizer and ``SimpleTrainer`` options; a CUDA model keeps ``trainer``."""
    if next(trainer.model.parameters()).device.type != "cpu":
        return trainer
    if cpu_has_native_bfloat16():
        logger.info("SOLVER.AMP.ENABLED on CPU: forward pass in bfloat16 (native on this CPU).")
        trainer_class = CPUAutocastTrainer
    else:
        logger.warning(
            "SOLVER.AMP.ENABLED on a CPU without native bfloat16 (no AVX512-BF16/AMX): bfloat16 "
            "would be emulated and slower, training in float32 instead."
        )
        trainer_class = SimpleTrainer
    trainer.concurrent_executor.shutdown()
    return trainer_class(
        trainer.model,
        trainer.data_loader,
        trainer.optimizer,
        gather_metric_period=trainer.gather_metric_period,
        zero_grad_before_forward=trainer.zero_grad_before_forward,
        async_write_metrics=trainer.async_write_metrics,
    )
