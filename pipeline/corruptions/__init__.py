"""Image corruptions at five severities: the seeds' Gaussian noise and an MNIST-C-style suite.

    from pipeline.corruptions import corrupt, list_corruptions
    noisy = corrupt(images, "gaussian_noise", 5, sample_ids, seed=0, norm_std=0.3081)

Parameters per severity live in `pipeline/corruptions/table.py`; docs/corruptions.md shows
them (regenerate with `python -m pipeline.corruptions --markdown`).
"""

from __future__ import annotations

# Registration happens on import, in this order (no directory scanning).
from pipeline.corruptions import blur, geometric, noise, overlay, validation  # noqa: F401
from pipeline.corruptions.core import (CORRUPTIONS, SEVERITIES, Corruption, corrupt,
                                       get_corruption, list_corruptions, list_validation_corruptions,
                                       parse_corruptions, parse_severities)
from pipeline.corruptions.markdown import markdown_table

__all__ = ["CORRUPTIONS", "SEVERITIES", "Corruption", "corrupt", "get_corruption",
           "list_corruptions", "list_validation_corruptions", "parse_corruptions", "parse_severities", "markdown_table"]
