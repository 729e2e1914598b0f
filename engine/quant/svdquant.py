"""SVDQuant for one linear layer: smoothing, the low-rank split, 4-bit residual, alpha search.

For ``Y = X W^T + b`` with ``X [M, K]``, ``W [N, K]``:

1. smoothing ``lambda_k = max|X_k|^a / max|W_k|^(1-a)``; ``X^ = X / lambda``, ``W^ = W * lambda``
2. low rank ``W^ ~= L1 L2`` (top-r SVD, ``L1 = U_r S_r [N, r]``, ``L2 = V_r^T [r, K]``)
3. the residual ``R = W^ - L1 L2`` is quantized to signed 4-bit, one scale per group
4. at run time ``Y = Q(X^) Q(R)^T + (X^ L2^T) L1^T + b``

Every tensor that is stored in 16 bits is rounded *before* the next step uses it (the
residual is taken against the rounded factors, the weight is smoothed by the rounded
lambda), so the rounding of the stored tensors is absorbed instead of added on top.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.quant.int4 import DEFAULT_GROUP_SIZE, pack_int4, quantize_int4

# The shift that makes a GELU-tanh output non-negative (its minimum is about -0.1700);
# 11/64 is exact in every float format.
GELU_SHIFT = 0.171875
DEFAULT_ALPHAS = tuple(i / 8 for i in range(9))
_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SVDQConfig:
    """How a model is quantized; stored in the checkpoint's metadata."""

    rank: int = 32
    group_size: int = DEFAULT_GROUP_SIZE
    alphas: tuple[float | None, ...] = DEFAULT_ALPHAS  # None: no smoothing (plain W4A4 at rank 0)
    svd_niter: int | None = None  # None: exact SVD; n: randomized SVD with n power iterations
    version: int = 1

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
        if not self.alphas or any(a is not None and not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(
                f"alphas must be a non-empty list of values in [0, 1] (or None), got {self.alphas}"
            )


@dataclasses.dataclass
class SVDQWeight:
    """The stored tensors of one W4A4 layer (checkpoint names)."""

    qweight: torch.Tensor  # uint8 [N, K/2]
    wscales: torch.Tensor  # [N, G]
    smooth_factor: torch.Tensor  # [K]
    proj_down: torch.Tensor  # [r, K]
    proj_up: torch.Tensor  # [N, r]
    bias: torch.Tensor | None  # [N]


def smooth_factors(act_max: torch.Tensor, weight: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """Per-input-channel ``lambda [K]`` in fp32; ``alpha=None`` means no smoothing (all ones)."""
    if alpha is None:
        return torch.ones(weight.shape[1], device=weight.device)
    a = act_max.to(weight.device, torch.float32).clamp_min(_EPS)
    w = weight.float().abs().amax(dim=0).clamp_min(_EPS)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(_EPS, 1.0 / _EPS)


def lowrank_split(
    w: torch.Tensor, rank: int, *, niter: int | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``w [N, K]`` in fp32: ``(L1 [N, r], L2 [r, K], residual [N, K])``.

    The factors are rounded to ``dtype`` (their storage type) before the residual is taken.
    ``niter`` switches to a randomized SVD (Halko et al.), much faster for r << min(N, K).
    """
    w = w.float()
    n, k = w.shape
    rank = min(rank, n, k)
    if rank == 0:
        return w.new_zeros(n, 0), w.new_zeros(0, k), w.clone()
    if niter is None or 2 * rank >= min(n, k):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(w, q=min(rank + 16, n, k), niter=niter)
        vh = v.mT
    l1 = u[:, :rank] * s[:rank]
    l2 = vh[:rank]
    if dtype is not None:
        l1, l2 = l1.to(dtype), l2.to(dtype)
    return l1, l2, w - l1.float() @ l2.float()


def quantize_svdq(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act_max: torch.Tensor,
    *,
    alpha: float | None,
    rank: int = 32,
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    act_shift: float = 0.0,
    svd_niter: int | None = None,
) -> SVDQWeight:
    """Quantize ``weight [N, K]`` for a fixed ``alpha``.

    ``act_max [K]`` is the per-channel maximum of the layer's input *after* the shift. With
    ``act_shift`` the layer sees ``x + shift`` (unsigned codes), and ``b - shift * W.sum(1)``
    is stored as its bias so the output is unchanged.
    """
    w = weight.float()
    smooth = smooth_factors(act_max, w, alpha).to(dtype)
    l1, l2, residual = lowrank_split(w * smooth.float(), rank, niter=svd_niter, dtype=dtype)
    codes, wscales = quantize_int4(residual, group_size, scale_dtype=dtype)
    if act_shift:
        shift_term = act_shift * w.sum(dim=1)
        bias = -shift_term if bias is None else bias.float() - shift_term
    return SVDQWeight(
        qweight=pack_int4(codes),
        wscales=wscales,
        smooth_factor=smooth,
        proj_down=l2.to(dtype),
        proj_up=l1.to(dtype),
        bias=None if bias is None else bias.to(dtype),
    )


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref|| / ||ref||`` in fp32."""
    ref = ref.float()
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def search_alpha(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    calib: torch.Tensor,
    config: SVDQConfig,
    *,
    act_max: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    unsigned: bool = False,
    act_shift: float = 0.0,
) -> tuple[SVDQWeight, float, float]:
    """Pick the migration strength that minimizes the layer's output error on ``calib [n, K]``.

    Each candidate is scored through the reference kernels, i.e. exactly the arithmetic that
    serves it. Returns ``(weights, alpha, relative error)``.
    """
    from engine.kernels import reference  # the ground truth scores the candidates

    x = calib.reshape(-1, calib.shape[-1]).float()
    if act_max is None:
        act_max = x.abs().amax(dim=0)
    shifted_max = act_max.float() + act_shift
    y_ref = x @ weight.float().T
    if bias is not None:
        y_ref = y_ref + bias.float()
    best = None
    for alpha in config.alphas:
        q = quantize_svdq(
            weight,
            bias,
            shifted_max,
            alpha=alpha,
            rank=config.rank,
            group_size=config.group_size,
            dtype=dtype,
            act_shift=act_shift,
            svd_niter=config.svd_niter,
        )
        y = reference.linear(x, q, unsigned=unsigned, act_shift=act_shift, group_size=config.group_size)
        err = relative_error(y, y_ref)
        if best is None or err < best[2]:
            best = (q, alpha, err)
    return best
