"""lorakit for HF transformers: default targets, Conv1D, PEFT-format export/import, Trainer support."""
