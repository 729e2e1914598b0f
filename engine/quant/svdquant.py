"""SVDQuant for one linear layer: smoothing, the low-rank split, 4-bit residual, alpha search.

For ``Y = X W^T + b`` with ``X [M, K]``, ``W [N, K]``:

1. smoothing ``lambda_k = max|X_k|^a / max|W_k|^(1-a)``; ``X^ = X / lambda``, ``W^ = W * lambda``
2. low rank ``W^ ~= L1 L2`` (top-r SVD, ``L1 = U_r S_r [N, r]``, ``L2 = V_r^T [r, K]``)
3. the residual ``R = W^ - L1 L2`` is quantized to signed 4-bit, one scale per group
4. at run time ``Y = Q(X^) Q(R)^T + (X^ L2^T) L1^T + b``

Step 3 rounds either to nearest (``rounding="rtn"``) or with error compensation
(``rounding="gptq"``, engine/quant/gptq.py): the columns of ``R`` are quantized in order and each
column's rounding error is pushed onto the later ones through the inverse of ``X^^T X^``, the
second moment of the smoothed calibration inputs, with the round-to-nearest group scales.

Every tensor that is stored in 16 bits is rounded *before* the next step uses it (the
residual is taken against the rounded factors, the weight is smoothed by the rounded
lambda), so the rounding of the stored tensors is absorbed instead of added on top.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.quant import ops  # the ground truth scores the candidates
from engine.quant.gptq import DEFAULT_DAMP, gptq_quantize, second_moment
from engine.quant.int4 import DEFAULT_GROUP_SIZE, pack_int4, quantize_int4

# The shift that makes a GELU-tanh output non-negative (its minimum is about -0.1700);
# 11/64 is exact in every float format.
GELU_SHIFT = 0.171875
DEFAULT_ALPHAS = tuple(i / 8 for i in range(9))
_EPS = 1e-5
ROUNDINGS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class SVDQConfig:
    """How a model is quantized; stored in the checkpoint's metadata."""

    rank: int = 32
    group_size: int = DEFAULT_GROUP_SIZE
    alphas: tuple[float | None, ...] = DEFAULT_ALPHAS  # None: no smoothing (plain W4A4 at rank 0)
    svd_niter: int | None = None  # None: exact SVD; n: randomized SVD with n power iterations
    # How the 4-bit residual is rounded: "rtn" (to nearest) or "gptq" (error-compensating, at the
    # alpha that round-to-nearest picked, kept only where it lowers the calibration error).
    rounding: str = "gptq"
    gptq_damp: float = DEFAULT_DAMP  # relative damping of X^T X (engine/quant/gptq.py)
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
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not self.gptq_damp > 0:
            raise ValueError(f"gptq_damp must be > 0, got {self.gptq_damp}")


@dataclasses.dataclass
class SVDQWeight:
    """The stored tensors of one W4A4 layer (checkpoint names)."""

    qweight: torch.Tensor  # uint8 [N, K/2]
    wscales: torch.Tensor  # [N, G]
    smooth_factor: torch.Tensor  # [K]
    proj_down: torch.Tensor  # [r, K]
    proj_up: torch.Tensor  # [N, r]
    bias: torch.Tensor | None  # [N]
    rounding: str = "rtn"  # which rounding produced qweight (not stored in the file)


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


def _split(
    weight: torch.Tensor,
    act_max: torch.Tensor,
    alpha: float | None,
    rank: int,
    dtype: torch.dtype,
    svd_niter: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smoothing and low-rank split: ``(lambda [K] in dtype, L1 [N, r], L2 [r, K], R [N, K] fp32)``."""
    w = weight.float()
    smooth = smooth_factors(act_max, w, alpha).to(dtype)
    l1, l2, residual = lowrank_split(w * smooth.float(), rank, niter=svd_niter, dtype=dtype)
    return smooth, l1, l2, residual


def smoothed_second_moment(calib: torch.Tensor, smooth: torch.Tensor, act_shift: float = 0.0) -> torch.Tensor:
    """``X^^T X^ [K, K]`` (fp32) of the smoothed inputs ``X^ = (X + shift) / lambda`` the residual sees."""
    x = calib.reshape(-1, calib.shape[-1]).float().to(smooth.device)
    return second_moment((x + act_shift) / smooth.float())


def _assemble(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    codes: torch.Tensor,
    wscales: torch.Tensor,
    *,
    dtype: torch.dtype,
    act_shift: float,
    rounding: str,
) -> SVDQWeight:
    smooth, l1, l2 = parts
    if act_shift:
        shift_term = act_shift * weight.float().sum(dim=1)
        bias = -shift_term if bias is None else bias.float() - shift_term
    return SVDQWeight(
        qweight=pack_int4(codes),
        wscales=wscales,
        smooth_factor=smooth,
        proj_down=l2.to(dtype),
        proj_up=l1.to(dtype),
        bias=None if bias is None else bias.to(dtype),
        rounding=rounding,
    )


def _round_residual(
    residual: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    rounding: str,
    hessian: torch.Tensor | None,
    gptq_damp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if rounding == "rtn":
        return quantize_int4(residual, group_size, scale_dtype=dtype)
    if rounding == "gptq":
        if hessian is None:
            raise ValueError('rounding="gptq" needs the calibration inputs (calib=...)')
        return gptq_quantize(residual, hessian, group_size, damp=gptq_damp, scale_dtype=dtype)
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


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
    rounding: str = "rtn",
    calib: torch.Tensor | None = None,
    gptq_damp: float = DEFAULT_DAMP,
) -> SVDQWeight:
    """Quantize ``weight [N, K]`` for a fixed ``alpha``.

    ``act_max [K]`` is the per-channel maximum of the layer's input *after* the shift. With
    ``act_shift`` the layer sees ``x + shift`` (unsigned codes), and ``b - shift * W.sum(1)``
    is stored as its bias so the output is unchanged. ``rounding="gptq"`` needs ``calib [n, K]``,
    the layer's calibration inputs (before the shift), for the second moment.
    """
    smooth, l1, l2, residual = _split(weight, act_max, alpha, rank, dtype, svd_niter)
    hessian = None if calib is None or rounding != "gptq" else smoothed_second_moment(calib, smooth, act_shift)
    codes, wscales = _round_residual(residual, group_size, dtype, rounding, hessian, gptq_damp)
    return _assemble(
        weight, bias, (smooth, l1, l2), codes, wscales, dtype=dtype, act_shift=act_shift, rounding=rounding
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
    serves it. With ``config.rounding == "gptq"`` the alpha is searched with round-to-nearest (a
    GPTQ pass costs about a third of the whole search on a 3072 x 3072 layer), then the chosen
    alpha's residual is rounded again with GPTQ, kept only if it wins on calibration rows it was
    not fitted on and lowers the calibration error (the returned weights' ``rounding`` says
    which). Returns ``(weights, alpha, relative error)``.
    """

    x = calib.reshape(-1, calib.shape[-1]).float()
    if act_max is None:
        act_max = x.abs().amax(dim=0)
    shifted_max = act_max.float() + act_shift
    y_ref = x @ weight.float().T
    if bias is not None:
        y_ref = y_ref + bias.float()

    def score(q: SVDQWeight, rows: slice = slice(None)) -> float:
        y = ops.linear(x[rows], q, unsigned=unsigned, act_shift=act_shift, group_size=config.group_size)
        return relative_error(y, y_ref[rows])

    def assemble(split: tuple, codes: torch.Tensor, wscales: torch.Tensor, rounding: str) -> SVDQWeight:
        return _assemble(
            weight, bias, split[:3], codes, wscales, dtype=dtype, act_shift=act_shift, rounding=rounding
        )

    best = None  # (weights, alpha, error, (smooth, L1, L2, residual))
    for alpha in config.alphas:
        split = _split(weight, shifted_max, alpha, config.rank, dtype, config.svd_niter)
        q = assemble(split, *quantize_int4(split[3], config.group_size, scale_dtype=dtype), "rtn")
        err = score(q)
        if best is None or err < best[2]:
            best = (q, alpha, err, split)
    q, alpha, err, split = best
    if config.rounding != "gptq" or x.shape[0] < 2:
        return q, alpha, err

    # GPTQ fits X^T X of the calibration rows; with fewer rows than channels, or channels that
    # are not correlated, it can fit their noise and lose on new inputs. So it is first fitted on
    # the first half of the rows and scored on the second half against round-to-nearest; only if
    # it wins there is it fitted on all rows, and kept if that lowers the calibration error.
    def gptq(rows: slice) -> SVDQWeight:
        hessian = smoothed_second_moment(x[rows], split[0], act_shift)
        codes, wscales = gptq_quantize(
            split[3], hessian, config.group_size, damp=config.gptq_damp, scale_dtype=dtype
        )
        return assemble(split, codes, wscales, "gptq")

    half = x.shape[0] // 2
    if score(gptq(slice(None, half)), slice(half, None)) >= score(q, slice(half, None)):
        return q, alpha, err
    q_gptq = gptq(slice(None))
    err_gptq = score(q_gptq)
    return (q_gptq, alpha, err_gptq) if err_gptq < err else (q, alpha, err)
