"""The per-worker training loop (`loop.Trainer`), the engine it trains with (`engine`: model, optimiser,
strategy), validation scored as `kitdist.evaluate` scores (`validation`), checkpoints, metrics, losses."""
