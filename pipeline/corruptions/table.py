"""Every corruption's parameters at severities 1..5, in one table.

docs/corruptions.md is generated from this table (`python -m pipeline.corruptions --markdown`)
and a test checks that the two agree. Each entry maps a parameter name to its values at
severities (1, 2, 3, 4, 5); the implementing function receives them as keyword arguments.
Severity 3 follows MNIST-C's single setting (Mu & Gilmer 2019) where that is meaningful;
`MNIST_C` records MNIST-C's setting for comparison.
"""

from __future__ import annotations

__all__ = ["SEVERITY_TABLE", "MNIST_C"]

SEVERITY_TABLE: dict[str, dict[str, tuple[float, ...]]] = {
    "identity": {},
    # noise
    "gaussian_noise": {"std_normalised": (0.4, 0.8, 1.2, 1.6, 2.0)},
    "shot_noise": {"photons": (24, 10, 3, 1.5, 0.8)},
    "impulse_noise": {"amount": (0.05, 0.10, 0.17, 0.27, 0.40)},
    # blur
    "glass_blur": {"sigma": (0.4, 0.6, 0.7, 0.8, 0.9),
                   "max_delta": (1, 1, 1, 2, 2),
                   "iterations": (1, 1, 2, 2, 3)},
    "motion_blur": {"sigma": (1.0, 2.0, 3.0, 4.0, 5.0),
                    "length": (4, 8, 12, 16, 20)},
    # geometry
    "shear": {"angle_rad": (0.10, 0.25, 0.40, 0.55, 0.70)},
    "scale": {"factor": (0.9, 0.8, 0.7, 0.6, 0.5)},
    "rotate": {"angle_rad": (0.10, 0.25, 0.40, 0.55, 0.70)},
    "translate": {"pixels": (1, 2, 3, 4, 5)},
    # intensity and overlays
    "brightness": {"shift": (0.2, 0.35, 0.5, 0.65, 0.8)},
    "stripe": {"width": (3, 5, 7, 9, 11)},
    "fog": {"amount": (1.5, 2.0, 3.0, 4.0, 5.0),
            "decay": (2.0, 1.7, 1.4, 1.3, 1.2)},
    "spatter": {"loc": (0.65,) * 5,
                "scale": (0.3,) * 5,
                "sigma": (1,) * 5,
                "threshold": (0.69, 0.67, 0.65, 0.63, 0.61),
                "mask_sigma": (1.5,) * 5},
    "dotted_line": {"lines": (1, 1, 1, 2, 3),
                    "dash_on": (1, 2, 2, 2, 2),
                    "dash_off": (3, 3, 2, 2, 2)},
    "zigzag": {"zigzags": (1, 1, 1, 2, 3),
               "span": (11, 17, 23, 23, 23)},
    "canny_edges": {"sigma": (1.0, 1.0, 1.0, 1.0, 1.0),
                    "blend": (0.2, 0.4, 0.6, 0.8, 1.0)},
    # validation (pipeline/corruptions/validation.py): for choosing settings, never reported
    "speckle_noise": {"std": (0.3, 0.45, 0.6, 0.8, 1.0)},
    "gaussian_blur": {"sigma": (0.5, 0.75, 1.0, 1.25, 1.5)},
    "contrast": {"factor": (0.4, 0.3, 0.2, 0.1, 0.05)},
    "stretch": {"factor": (0.9, 0.8, 0.7, 0.6, 0.5)},
}

# MNIST-C's own (single) setting, in this table's terms.
MNIST_C: dict[str, str] = {
    "identity": "identity",
    "gaussian_noise": "not in MNIST-C; severity 5 = the seed tutorials' N(0, 2²) after normalisation",
    "shot_noise": "photons 3",
    "impulse_noise": "amount 0.17",
    "glass_blur": "sigma 0.7, max_delta 1, iterations 2",
    "motion_blur": "ImageMagick radius 10, sigma 3",
    "shear": "angle 0.4 rad",
    "scale": "factor 0.7",
    "rotate": "angle 0.4 rad",
    "translate": "pixels 3",
    "brightness": "shift 0.5",
    "stripe": "width 7",
    "fog": "amount 3.0, decay 1.4",
    "spatter": "loc 0.65, scale 0.3, sigma 1, threshold 0.65, mask_sigma 1.5",
    "dotted_line": "1 line, 2 on / 2 off",
    "zigzag": "1 zigzag over columns 2-25 (span 23)",
    "canny_edges": "sigma 1, blend 1 (edges only)",
    "speckle_noise": "not in MNIST-C (validation; ImageNet-C's speckle_noise)",
    "gaussian_blur": "not in MNIST-C (validation; ImageNet-C's gaussian_blur)",
    "contrast": "not in MNIST-C (validation; ImageNet-C's contrast factors 0.4..0.05)",
    "stretch": "not in MNIST-C (validation; scale on one axis)",
}
