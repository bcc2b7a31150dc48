"""Speed and memory beside the core: the chunked loss, torch.compile, AdamW in bf16, NF4."""
