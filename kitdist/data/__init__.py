"""The data pipeline: shards -> samples -> crops and degradations -> batches, resumable exactly.

`TrainStream` serves one rank's endless training batches and its position; `val_batches` one rank's part
of the validation set. See `stream.py` for the resume guarantees, `order.py` for how samples are split
and `stream_state.py` for the position a checkpoint stores.
"""

from __future__ import annotations

from kitdist.data.stream import ResumeError, TrainStream
from kitdist.data.val import val_batches

__all__ = ["ResumeError", "TrainStream", "val_batches"]
