"""lorakit for diffusers: UNet/DiT targets and diffusers LoRA export."""
