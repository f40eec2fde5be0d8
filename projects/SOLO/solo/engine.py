"""Mixed precision on CPU: ``SOLVER.AMP.ENABLED`` with ``MODEL.DEVICE cpu``.

Detectron2's ``AMPTrainer`` is CUDA-only (float16 with a gradient scaler). On a CPU with native
bfloat16 (AVX512-BF16 or AMX), oneDNN runs bfloat16 convolutions much faster than float32: a
shapes training iteration takes ~0.29 s instead of ~0.38 s on 2 cores. bfloat16 keeps float32's
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
    bfloat16; backward and the optimizer step run outside autocast, as PyTorch recommends."""

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_amp_trainer(amp_trainer_class, model, data_loader, optimizer, **kwargs):
    """What ``DefaultTrainer`` gets for ``SOLVER.AMP.ENABLED``: Detectron2's CUDA AMPTrainer
    for a CUDA model; on CPU the bfloat16 trainer, or plain float32 training (with a warning)
    where the CPU has no native bfloat16."""
    if next(model.parameters()).device.type != "cpu":
        return amp_trainer_class(model, data_loader, optimizer, **kwargs)
    if cpu_has_native_bfloat16():
        logger.info("SOLVER.AMP.ENABLED on CPU: forward pass in bfloat16 (native on this CPU).")
        return CPUAutocastTrainer(model, data_loader, optimizer)
    logger.warning(
        "SOLVER.AMP.ENABLED on a CPU without native bfloat16 (no AVX512-BF16/AMX): bfloat16 "
        "would be emulated and slower, training in float32 instead."
    )
    return SimpleTrainer(model, data_loader, optimizer)
