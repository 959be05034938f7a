"""Train a LoRA on a diffusers UNet and export a file that ``pipe.load_lora_weights`` reads.

    python examples/diffusers_unet.py                   # a tiny random UNet, seconds on a CPU
    python examples/diffusers_unet.py --model PATH      # a local Stable Diffusion folder (its unet/)

The export (``pytorch_lora_weights.safetensors``) is the format diffusers' own LoRA
training scripts write: any Stable Diffusion pipeline loads it with
``pipe.load_lora_weights(folder)``, no lorakit needed.
"""

import argparse
import copy

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from lorakit.core import Adapter, parameter_report, trainable_parameters
from lorakit.diffusers import export_diffusers

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", help="local Stable Diffusion folder (default: a tiny random UNet)")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--out", default="out/unet-lora")
args = parser.parse_args()

if args.model:
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
else:  # the Stable Diffusion UNet's architecture, small enough for CI
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
base = copy.deepcopy(unet)  # kept only to check the export against below

# No targets: the registered UNet defaults, the attention projections (to_q, to_k, to_v,
# to_out.0); lorakit.diffusers.targets(unet, conv=True) adds the ResNet convolutions.
Adapter.from_recipe("lora", rank=4).apply(unet)
print(parameter_report(unet))

# Toy training: predict the noise added to random latents (the diffusion loss).
c = unet.config
latents = torch.randn(4, c.in_channels, c.sample_size, c.sample_size)
text = torch.randn(4, 8, c.cross_attention_dim)  # stands in for the text encoder's output
optimizer = torch.optim.AdamW(trainable_parameters(unet).values(), lr=1e-2)
for _ in range(args.steps):
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (4,))
    loss = (unet(latents + noise, t, text).sample - noise).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"{args.steps} steps, loss {loss.item():.4f}")

export = export_diffusers(unet, args.out, prefix="unet")
print(f"exported {export.path}")

# Load it the diffusers way, into a pipeline built around the untouched UNet (a real
# pipeline comes from StableDiffusionPipeline.from_pretrained(folder) instead).
diffusers_logging.set_verbosity_error()  # this pipeline has no text encoder to load a LoRA into: fine
pipe = StableDiffusionPipeline(unet=base, vae=None, text_encoder=None, tokenizer=None,
                               scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False)
pipe.load_lora_weights(args.out)
with torch.no_grad():
    ours, theirs = unet(latents, 10, text).sample, pipe.unet(latents, 10, text).sample
print(f"pipeline with the exported LoRA vs lorakit's UNet: largest difference {(ours - theirs).abs().max():.1e}")
