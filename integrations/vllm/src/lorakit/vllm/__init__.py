"""lorakit and a running vLLM server: :func:`push` an adapter from memory.

    from lorakit.vllm import push

    push(model, "http://127.0.0.1:8000", "policy-v1")
    ...                                                  # train more
    push(model, "http://127.0.0.1:8000", "policy-v2", previous="policy-v1")

The server runs ``vllm serve BASE --enable-lora --max-lora-rank R`` with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. Only the standard library talks HTTP.
"""

from .client import Pushed, PushError, push

__all__ = ["PushError", "Pushed", "push"]
