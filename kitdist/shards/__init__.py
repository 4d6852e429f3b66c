"""Shard building: raw dataset folders -> WebDataset tars + manifest.json on any fsspec URL."""
