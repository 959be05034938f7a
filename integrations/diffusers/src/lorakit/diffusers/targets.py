"""Default adapter targets for diffusers models.

diffusers models have no ``config.model_type``, so targets are registered under the
model's class name (``lorakit.core.default_targets`` tries the class name next).
Every model below routes its attention through diffusers' ``Attention`` blocks,
whose projections are ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` — the set the
diffusers LoRA training scripts adapt.
"""

from __future__ import annotations

from torch import nn

from lorakit.core import AdapterError, default_targets

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]

# The ResNet convolutions of a UNet (kohya's "LoCon" set): opt-in, since a conv
# adapter costs rank × in·kh·kw parameters per layer.
RESNET_CONVS = ["conv1", "conv2", "conv_shortcut"]

MODELS = (
    "UNet2DConditionModel",
    "UNet2DModel",
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "PixArtTransformer2DModel",
    "DiTTransformer2DModel",
    "SanaTransformer2DModel",
)


def targets(model: nn.Module, conv: bool = False) -> list[str]:
    """The default targets of ``model``, plus its ResNet ``Conv2d`` layers if ``conv``.

    >>> Adapter.from_recipe("lora", rank=8).apply(unet, targets=targets(unet, conv=True))
    """
    names = list(default_targets(model))
    if not conv:
        return names
    convs = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and n.rsplit(".", 1)[-1] in RESNET_CONVS]
    if not convs:
        found = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        raise AdapterError(
            f"{type(model).__name__} has no ResNet convolutions ({', '.join(RESNET_CONVS)}); "
            "pass targets=[...] naming the Conv2d modules to adapt"
            + (f", e.g. {', '.join(found[:4])}" if found else " (it has no Conv2d at all)")
        )
    return names + RESNET_CONVS
