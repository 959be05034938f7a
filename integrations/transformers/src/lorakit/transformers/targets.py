"""Default target modules per architecture (``config.model_type``), registered through
the ``lorakit_targets`` hook, so ``Adapter(...).apply(model)`` needs no ``targets``.

The lists follow common practice for each family: every projection of attention
and MLP for decoder LLMs and encoder-decoders (T5, BART, Whisper, CLIP), the fused
``Conv1D`` projections for GPT-2, the attention and dense layers for BERT-style
encoders, and query/value for ViT and DINOv2 (as in the LoRA and LoLDU papers).
Output heads (``lm_head``, the CLIP projections) are never listed: train them with
``modules_to_save``. Each family is checked on a tiny config (tests/test_targeting.py).
"""

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# fused query-key-value, attention output and the two MLP layers
FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# attention (out_proj) and MLP (fc1/fc2) of the BART/OPT/Whisper/CLIP encoder-decoder style
FAIRSEQ_LIKE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
BERT_LIKE = ["query", "key", "value", "dense"]
# transformers 5 renamed ViT's attention projections; list both spellings so the
# defaults work across the supported versions (a name absent from a model matches nothing).
VIT_LIKE = ["query", "value", "q_proj", "v_proj"]

DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"], LLAMA_LIKE),
    # MoE: the experts of transformers 5 are fused parameters, not Linear modules; these
    # names reach attention, Qwen2-MoE's shared expert, and per-expert Linears where a
    # version has them (the router and shared_expert_gate stay frozen)
    **dict.fromkeys(["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"], LLAMA_LIKE),
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    **dict.fromkeys(["falcon", "gpt_neox", "bloom"], FUSED_QKV),
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    **dict.fromkeys(["opt", "bart", "whisper", "clip"], FAIRSEQ_LIKE),
    # T5 v1.0 has one wi, v1.1 / mT5 a gated pair wi_0, wi_1
    **dict.fromkeys(["t5", "mt5"], ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]),
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta"], BERT_LIKE),
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "modernbert": ["Wqkv", "Wo", "Wi"],
    **dict.fromkeys(["vit", "dinov2"], VIT_LIKE),
}
