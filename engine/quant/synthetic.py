"""Synthetic layers with the activation statistics of diffusion transformers.

Real FLUX activations have a handful of channels tens of times larger than the rest, and
real weights have a decaying singular spectrum. Both are what SVDQuant is designed for, so
the report, the tests and the benchmark's random calibration use data shaped like that.
"""

from __future__ import annotations

import torch


def outlier_activations(
    n: int,
    k: int,
    *,
    n_outliers: int = 8,
    outlier_scale: float = 40.0,
    seed: int = 0,
    sample_seed: int | None = None,
) -> torch.Tensor:
    """``[n, K]`` fp32: log-normal per-channel spread plus ``n_outliers`` huge channels.

    ``seed`` fixes the channels (which are outliers, how wide each is), ``sample_seed`` the
    tokens, so calibration and held-out tokens of the same layer share their outliers.
    """
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.exp(0.5 * torch.randn(k, generator=g))
    outliers = torch.randperm(k, generator=g)[:n_outliers]
    channel_scale[outliers] *= outlier_scale
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    return torch.randn(n, k, generator=g) * channel_scale


def structured_weight(n: int, k: int, *, seed: int = 0) -> torch.Tensor:
    """``[N, K]`` fp32: a Gaussian matrix plus a low-rank part with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed + 1)
    r = min(64, n, k)
    spectrum = 4.0 * torch.exp(-torch.arange(r) / 8.0)
    u = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(k, r, generator=g)).Q
    return (torch.randn(n, k, generator=g) + (u * spectrum) @ v.T * k**0.5) / k**0.5
