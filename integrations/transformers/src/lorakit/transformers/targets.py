"""Default target modules per architecture (``config.model_type``), registered through
the ``lorakit_targets`` hook, so ``Adapter(...).apply(model)`` needs no ``targets``.

The lists follow common practice for each family: every projection of attention
and MLP for decoder LLMs, the fused ``Conv1D`` projections for GPT-2, the
attention and dense layers for BERT-style encoders, and query/value for ViT (as
in the LoRA and LoLDU papers).
"""

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    # transformers 5 renamed ViT's attention projections; list both spellings so the
    # defaults work across the supported versions (a name absent from a model matches nothing).
    "vit": ["query", "value", "q_proj", "v_proj"],
}
