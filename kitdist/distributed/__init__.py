"""Distributed execution: the Strategy interface (DeepSpeed or DDP) and process-environment helpers."""
