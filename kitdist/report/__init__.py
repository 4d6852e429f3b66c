"""What users look at after training: comparison grids (input | restored | target, with zoomed crops, in
the style of the KiT paper's figures 2-5) and the PSNR-vs-GMACs chart of its figure 1."""

from __future__ import annotations

from kitdist.report.chart import PUBLISHED_SIDD, MeasuredPoint, PublishedPoint, draw_chart
from kitdist.report.grids import comparison_grid, detail_box

__all__ = ["MeasuredPoint", "PublishedPoint", "PUBLISHED_SIDD", "comparison_grid", "detail_box", "draw_chart"]
