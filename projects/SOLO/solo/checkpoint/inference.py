"""The one way to build a model for inference from a config: build, load weights strictly, eval."""

from torch import nn

from detectron2.modeling import build_model

from .checkpointer import SOLOCheckpointer

__all__ = ["build_inference_model"]


def build_inference_model(
    cfg, *, allow_random_weights: bool = False, resume: bool = False, save_dir: str = ""
) -> nn.Module:
    """``build_model(cfg)`` on ``cfg.MODEL.DEVICE`` with ``cfg.MODEL.WEIGHTS`` loaded strictly
    (:class:`SOLOCheckpointer`), in eval mode.

    Args:
        cfg: a config with ``MODEL.SOLO`` (``solo.get_solo_cfg``).
        allow_random_weights: an empty ``MODEL.WEIGHTS`` keeps the random initialisation (for
            trying tools out, the benchmark and tests) instead of raising.
        resume: load the last checkpoint of ``save_dir`` instead (``--eval-only --resume``).
        save_dir: where ``resume`` looks (usually ``cfg.OUTPUT_DIR``).

    Raises:
        CheckpointMismatchError: the weights do not fit the model (shapes, missing or extra
            keys), an empty ``MODEL.WEIGHTS`` without ``allow_random_weights``, ``resume``
            without a checkpoint in ``save_dir``, or an exported file (``.onnx``, ``.ts``,
            ``.pt2``) given as a checkpoint.
    """
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS or resume or not allow_random_weights:
        SOLOCheckpointer(model, save_dir=save_dir, strict=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=resume
        )
    return model.eval()
