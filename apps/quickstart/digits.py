"""The quickstart's digits: scikit-learn's bundled scans as images, and a classifier that reads images back.

Every fifth scan is held out (no training sample shows it). The classifier (logistic regression on the
training scans, 8 x 8 at scikit-learn's 0..16 scale) judges drawn digits and VQ reconstructions: an image
is reduced to 8 x 8 the same way before it is read.
"""

from __future__ import annotations

import numpy as np

SIZE = 32  # the quickstart's image size (px)


def heldout_scan(k: int) -> bool:
    """Every fifth scikit-learn digit scan is held out: no training sample shows it."""
    return k % 5 == 0


def scans(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 8, 8) at 0..16, labels (n,)) of one split: `train` or `heldout`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.array([heldout_scan(k) == (split == "heldout") for k in range(len(digits.target))])
    return digits.images[keep], digits.target[keep]


def digit_image(pixels: np.ndarray, size: int = SIZE):
    """An 8 x 8 scan (0..16) as an RGB PIL image of `size` px (bicubic)."""
    from PIL import Image

    gray = (pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def to_scan(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) or (3, H, W) image in [0, 1] -> 8 x 8 at 0..16 (box-averaged gray)."""
    x = np.asarray(image, dtype=np.float64)
    if x.shape[0] == 3:
        x = x.transpose(1, 2, 0)
    gray = x.mean(axis=-1)
    h, w = gray.shape
    return gray.reshape(8, h // 8, 8, w // 8).mean(axis=(1, 3)) * 16.0


class DigitClassifier:
    """Logistic regression on the training scans (held-out accuracy ~0.96)."""

    def __init__(self):
        from sklearn.linear_model import LogisticRegression

        images, labels = scans("train")
        self.model = LogisticRegression(max_iter=2000).fit(images.reshape(len(images), -1), labels)

    def predict(self, scans8: np.ndarray) -> np.ndarray:
        """(n, 8, 8) at 0..16 -> (n,) digits."""
        return self.model.predict(np.asarray(scans8).reshape(len(scans8), -1))
