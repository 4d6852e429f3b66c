"""The per-worker training loop, its checkpoints, metrics, losses and optimiser."""
