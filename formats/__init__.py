"""File formats and exports: checkpoints, GGUF, tokenizer files, adapters, Ollama."""
