"""Running SOLO: the trainer (Detectron2's DefaultTrainer with SOLO's pieces), its hooks and CPU
mixed-precision loop, the checks made before a run, resumption, and the Predictor."""

from .checks import RunConfigError, check_run_config, check_weights_file
from .predictor import Predictor
from .train_loop import CPUAutocastTrainer, trainer_for_cpu_amp

__all__ = [
    "CPUAutocastTrainer",
    "Predictor",
    "RunConfigError",
    "check_run_config",
    "check_weights_file",
    "trainer_for_cpu_amp",
]
