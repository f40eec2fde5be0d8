"""Registry of SOLO instance heads (``MODEL.SOLO.HEAD_NAME``)."""

from detectron2.utils.registry import Registry

SOLO_HEAD_REGISTRY = Registry("SOLO_HEAD")
SOLO_HEAD_REGISTRY.__doc__ = """
Instance heads of the SOLO meta-architecture. A head is called with the list of FPN features
named by ``MODEL.SOLO.IN_FEATURES`` and returns category logits and mask predictions; see
:class:`solo.heads.base.SOLOHeadBase`.
"""


def build_solo_head(cfg, input_shape):
    name = cfg.MODEL.SOLO.HEAD_NAME
    if name not in SOLO_HEAD_REGISTRY:
        raise KeyError(
            f"MODEL.SOLO.HEAD_NAME={name!r} is not a registered SOLO head; available: "
            f"{sorted(k for k, _ in SOLO_HEAD_REGISTRY)}."
        )
    return SOLO_HEAD_REGISTRY.get(name)(cfg, input_shape)
