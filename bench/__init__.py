"""Benchmarks: one training step measured beside the peer stacks (tokens/s, memory, MFU)."""
