"""Small seeded samplers shared by the synthetic generators."""

from __future__ import annotations

import numpy as np


def random_len(rng: np.random.Generator, full_len: int, range_ratio: float) -> int:
    """A length uniform in [full_len * range_ratio, full_len] (SGLang bench_serving's rule), at least 1."""
    low = max(1, int(full_len * range_ratio))
    return int(rng.integers(low, full_len + 1)) if low < full_len else max(1, full_len)


def zipf_weights(n: int, alpha: float) -> np.ndarray:
    """Normalised popularity of ranks 1..n under a Zipf law with exponent `alpha`."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    return w / w.sum()


def new_key(rng: np.random.Generator) -> int:
    """A fresh 63-bit content key."""
    return int(rng.integers(1, 1 << 63))
