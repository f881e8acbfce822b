"""Loading a model: GGUF and orbax checkpoints, the weights table, tokenizer, config resolution."""
