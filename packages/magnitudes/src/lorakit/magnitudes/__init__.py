"""lorakit magnitude heads: rescale the rows of V = W̄ + ΔW."""

__all__: list[str] = []
