"""Error-compensating rounding (GPTQ) of the 4-bit residual.

Round-to-nearest quantizes every weight on its own. GPTQ (Frantar et al., 2022) quantizes the
columns (input channels) of ``R [N, K]`` in order and, after each column, moves that column's
rounding error onto the columns not yet quantized, weighted by the inverse of the layer's input
second moment ``H = X^T X [K, K]``, so the *output* error ``||X (R - Q)^T||`` is what is
minimised, not the weight error. Here ``X`` is the layer's smoothed calibration input
``X^ = (X + shift) / lambda``: the residual of SVDQuant multiplies exactly that.

Group scales: one scale per row and group of ``group_size`` consecutive channels, as the
kernels read them. ``static_groups=True`` fixes every scale from the residual before any update
(``max|R_g| / 7``, the round-to-nearest scale); ``False`` computes a group's scale when its first
column is reached, from the columns as updated so far (the original GPTQ's grouping). Both are
the same storage format.

Everything is fp32; the column loop runs over blocks of ``block_size`` columns with the update of
later columns deferred to one matmul per block (the "lazy batch" of the paper); memory is a few
``[K, K]`` matrices (``H``, its inverse and that inverse's Cholesky factor) and two copies of ``R``.
"""

from __future__ import annotations

import torch

from engine.quant.int4 import DEFAULT_GROUP_SIZE, _check_groups

DEFAULT_DAMP = 1.0  # chosen by 2-fold cross-validation on calibration text (docs/quantization.md)
DEFAULT_BLOCK = 128


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """``H = X^T X [K, K]`` in fp32 for ``x [..., K]``: what GPTQ needs to know of the inputs."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; dead channels get ``H_kk = 1``.

    The damping is relative, as in GPTQ: it keeps the inverse stable when the calibration set has
    fewer rows than ``K`` (``H`` is then singular) and limits how far errors are pushed.
    """
    h = h.float().clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag.add_(damp * diag.mean())
    for attempt in range(4):  # a near-singular H in fp32: add damping until it factors
        chol, info = torch.linalg.cholesky_ex(h)
        if not info.item():
            break
        h.diagonal().add_(diag.mean() * 10.0 ** (attempt - 2))
    else:
        raise RuntimeError("gptq: the damped second moment is not positive definite")
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True)


def _group_scale(w: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Signed 4-bit scale of ``w [N, gs]`` rows, as stored: ``max|w| / 7`` rounded to ``scale_dtype``."""
    return (w.abs().amax(dim=-1) / w.new_tensor(7.0)).to(scale_dtype)


@torch.no_grad()
def gptq_quantize(
    residual: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    static_groups: bool = True,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed 4-bit group codes of ``residual [N, K]`` chosen to minimise ``||X (R - Q)^T||``.

    ``hessian [K, K]`` is ``X^T X`` of the inputs the residual multiplies. Returns ``(codes int8
    [N, K] in [-8, 7], scales [N, G] in scale_dtype)``, the same contract as
    :func:`engine.quant.int4.quantize_int4` (codes computed against the scale as stored).
    Deterministic: no randomness, fixed column order.
    """
    g = _check_groups(residual, group_size, "residual")
    n, k = residual.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
    if block_size <= 0 or block_size % group_size:
        raise ValueError(f"block_size must be a positive multiple of group_size {group_size}, got {block_size}")
    # Work on R^T [K, N]: a column of R is a contiguous row here, and every update below is
    # a contiguous row operation or a matmul.
    wt = residual.float().T.contiguous()  # [K, N], updated in place as errors are pushed forward
    u = _inverse_cholesky(hessian.to(wt.device), damp)  # [K, K] upper
    scales = torch.empty(g, n, dtype=scale_dtype, device=wt.device)  # [G, N]
    if static_groups:
        scales.copy_(_group_scale(wt.view(g, group_size, n).transpose(1, 2), scale_dtype))
    codes = torch.empty(k, n, dtype=torch.int8, device=wt.device)  # [K, N]
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = wt[b0:b1]  # [B, N] view: in-block updates land in wt
        err = torch.empty_like(wb)  # [B, N] scaled errors of the block's columns
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            gi = col // group_size
            if col % group_size == 0:
                if not static_groups:
                    scales[gi] = _group_scale(wb[j : j + group_size].T, scale_dtype)
                s = scales[gi].float()  # [N]
                s_safe = torch.where(s > 0, s, 1.0)
            q = torch.round(wb[j] / s_safe).clamp_(-8, 7).masked_fill_(s == 0, 0.0)
            codes[col] = q.to(torch.int8)
            e = (wb[j] - q * s) / ub[j, j]
            err[j] = e
            if j + 1 < b1 - b0:
                wb[j + 1 :].addr_(ub[j, j + 1 :], e, alpha=-1.0)
        if b1 < k:
            wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1.0)
    return codes.T.contiguous(), scales.T.contiguous()
