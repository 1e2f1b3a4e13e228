"""Per-token log-probabilities and entropy, from logits or from hidden states and an LM head."""
