"""lorakit studies: the papers' experiments reproduced with the library's own code.

    lorakit mf --optimizer sgd --json mf.json --plot mf.png   # OP-LoRA's matrix factorization (§4.1)

Each study is a subcommand registered through the ``lorakit_commands`` hook; the
results and how they compare with the papers are in docs/papers/.
"""
