"""What a training run prints as it goes: the progress line of a logging step and durations as a clock
reads them (also the end-of-run summary's, `kitdist.summary`)."""

from __future__ import annotations

from typing import Any

from kitdist.config import RunConfig


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(cfg: RunConfig, step: int, record: dict[str, Any]) -> str:
    """step 100/3600 | loss ... | lr ... | samples_per_s ... | ETA ... | data-wait ... | MFU ... | val ..."""
    parts = [f"step {step}/{cfg.train.max_steps}"]
    for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("samples_per_s", "{:.1f}/s")):
        if key in record:
            parts.append(f"{key} " + fmt.format(record[key]))
    if record.get("samples_per_s") and step < cfg.train.max_steps:  # at the pace of the last window
        left = (cfg.train.max_steps - step) * cfg.data.global_batch_size / record["samples_per_s"]
        parts.append(f"ETA {duration(left)}")
    if "data_wait_share" in record:
        parts.append(f"data-wait {record['data_wait_share']:.0%}")
    if "mfu" in record:
        parts.append(f"MFU {record['mfu']:.2%}")
    if "val_psnr_rgb" in record:
        parts.append(f"val PSNR {record['val_psnr_rgb']:.2f} dB / SSIM {record['val_ssim_rgb']:.4f} (RGB)")
    return " | ".join(parts)
