"""The run directory: --out, checkpoints, resume, metrics, the memory estimate, torchrun."""
