"""lorakit finetune / compare: offline fine-tuning of a pretrained model with any recipe."""
