"""The KiT model: LSH k-NN local attention, k-NN transformer blocks, the U-net, named sizes.

from kitdist.model import build_model, SIZES, KiT
model = build_model(ModelConfig(size="debug"))   # an nn.Module: restored = model(degraded)
"""

from __future__ import annotations

from kitdist.model.kit import KiT, build_model
from kitdist.model.sizes import SIZES, ModelSize, resolve_size

__all__ = ["KiT", "SIZES", "ModelSize", "build_model", "resolve_size"]
