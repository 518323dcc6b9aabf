"""Synthetic (features, TTFT) samples for the model tests: TTFT grows with the prefill backlog per unit of speed."""

from __future__ import annotations

import numpy as np

from lodestar.features import FEATURE_INDEX, N_FEATURES


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows with a TTFT that grows with the prefill backlog per unit of GPU speed, and an analytic
    estimate (`ttft_estimate_ms`) of it that is off by a factor depending on the GPU type, and noisy."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, N_FEATURES))) * 50.0
    x[:, FEATURE_INDEX["kv_usage"]] = rng.uniform(0.0, 1.0, n)
    x[:, FEATURE_INDEX["gpu_speed"]] = rng.choice([0.4, 1.0, 3.2], n)
    backlog = rng.uniform(0, 20_000, n)
    x[:, FEATURE_INDEX["backlog_tokens_per_speed"]] = backlog / x[:, FEATURE_INDEX["gpu_speed"]]
    y = 15.0 + 0.2 * x[:, FEATURE_INDEX["backlog_tokens_per_speed"]] * rng.lognormal(0.0, 0.05, n)
    noiseless = 15.0 + 0.2 * x[:, FEATURE_INDEX["backlog_tokens_per_speed"]]
    bias = np.exp(0.4 * (x[:, FEATURE_INDEX["gpu_speed"]] - 1.0))
    x[:, FEATURE_INDEX["ttft_estimate_ms"]] = noiseless * bias * rng.lognormal(0.0, 0.1, n)
    return x, y
