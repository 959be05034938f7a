"""lorakit for diffusers: UNet/DiT default targets and diffusers LoRA export.

    from lorakit.core import Adapter
    from lorakit.diffusers import export_diffusers, targets

    Adapter.from_recipe("dora", rank=8).apply(unet)              # to_q, to_k, to_v, to_out.0
    Adapter.from_recipe("lora", rank=8).apply(unet, targets=targets(unet, conv=True))
    export_diffusers(unet, "out/", prefix="unet")                # pipe.load_lora_weights("out/")
    export_kohya(unet, "lora.safetensors", text_encoder=te)     # A1111 / ComfyUI / kohya file
"""

from .export import (
    METADATA_KEY,
    WEIGHT_NAME,
    DiffusersExport,
    default_prefix,
    diffusers_state_dict,
    export_diffusers,
)
from .kohya import KOHYA_NAME, export_kohya
from .targets import ATTENTION, MODELS, RESNET_CONVS, targets

__all__ = [
    "ATTENTION", "KOHYA_NAME", "METADATA_KEY", "MODELS", "RESNET_CONVS", "WEIGHT_NAME", "DiffusersExport",
    "default_prefix", "diffusers_state_dict", "export_diffusers", "export_kohya", "targets",
]
