"""The public engine's (nunchaku's) tensor layouts: each packer beside its unpacker, the exact inverse.

W4A4 weights in MMA-fragment tile order, their scales and per-channel vectors in lane order,
low-rank factors in 16x16 packs, AWQ W4A16 weights in TinyChat's order, and the AdaLN linears'
interleaved output channels (docs/checkpoint-format.md). engine.flux.nunchaku reads whole
checkpoints with them; the tests make files in their layout from ours with the packers.
"""

from __future__ import annotations

import torch

# --- W4A4 weights: MMA tile order (n tiles of 128, k tiles of 64) ------------------------------
# Codes [N, K] view as (n_tile, n_pack 8, n_in_pack 2, n_lane 8, 1, k_tile, 1, k_in_pack 2,
# k_lane 4, k_reg 8) and are stored permuted to:
_W_VIEW = (8, 2, 8, 1, 1, 2, 4, 8)
_W_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _check_tiles(n: int, k: int, what: str) -> None:
    if n % 128 or k % 128:
        raise ValueError(f"{what}: N={n} and K={k} must be multiples of 128 in the public engine's layout")


def pack_w4a4_weight(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes int8 [N, K] -> their int8 [N, K/2]."""
    n, k = codes.shape
    _check_tiles(n, k, "qweight")
    t = codes.to(torch.int32).reshape(n // 128, *_W_VIEW[:4], k // 64, *_W_VIEW[4:])
    t = t.permute(_W_PERM).contiguous() & 0xF
    t = (t << torch.arange(0, 32, 4, dtype=torch.int32)).sum(dim=-1, dtype=torch.int32)
    return t.view(torch.int8).reshape(n, k // 2)


def unpack_w4a4_weight(packed: torch.Tensor) -> torch.Tensor:
    """Their int8 [N, K/2] -> signed codes int8 [N, K]."""
    n, half_k = packed.shape
    k = 2 * half_k
    _check_tiles(n, k, "qweight")
    words = packed.contiguous().view(torch.int32)  # [N, K/8], little-endian
    shape = (n // 128, k // 64, 1, 8, 8, 4, 2, 2, 1)
    nibbles = (words.reshape(shape).unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF
    nibbles = nibbles - ((nibbles & 0x8) << 1)  # sign-extend
    return nibbles.permute(_inverse(_W_PERM)).reshape(n, k).to(torch.int8)


# --- W4A4 scales: [K/64, N], per 128 outputs in lane order -------------------------------------
_S_PERM = (0, 6, 1, 2, 4, 3, 5)


def pack_wscales(scales: torch.Tensor) -> torch.Tensor:
    """Ours [N, G] -> theirs [G, N]."""
    n, g = scales.shape
    return scales.reshape(n // 128, 1, 8, 2, 4, 2, g).permute(_S_PERM).contiguous().view(g, n)


def unpack_wscales(packed: torch.Tensor) -> torch.Tensor:
    """Theirs [G, N] -> ours [N, G]."""
    g, n = packed.shape
    t = packed.contiguous().view(n // 128, g, 1, 8, 4, 2, 2)
    return t.permute(_inverse(_S_PERM)).reshape(n, g)


# Per-channel vectors of a W4A4 layer (``bias`` [N], ``smooth``/``smooth_orig`` [K]) are written
# by the same scale packer with one group, so they sit in the lane order of a [1, N] wscales.


def pack_lane_vector(v: torch.Tensor) -> torch.Tensor:
    """Ours (plain [C]) -> theirs ([C] in the scale lane order)."""
    return pack_wscales(v.reshape(-1, 1)).reshape(-1)


def unpack_lane_vector(packed: torch.Tensor) -> torch.Tensor:
    """Theirs ([C] in the scale lane order) -> ours (plain [C])."""
    return unpack_wscales(packed.reshape(1, -1)).reshape(-1)


# --- low-rank factors: 16 x 16 packs ------------------------------------------------------------
_L_PERM = (0, 1, 3, 6, 2, 5, 4, 7)  # (c, r, n_in 2, n_lane 8, 1, k_in 2, k_lane 4, k_reg 2) -> lanes first


def _lowrank_packs(rows: int, cols: int) -> None:
    if rows % 16 or cols % 16:
        raise ValueError(f"low-rank factor [{rows}, {cols}]: both sides must be multiples of 16")


def pack_lowrank(w: torch.Tensor, *, down: bool) -> torch.Tensor:
    """Ours (down [R, K] or up [N, R]) -> theirs (down [K, R], up [N, R])."""
    if down:
        r, c = w.shape
        _lowrank_packs(r, c)
        t = w.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)  # (K/16, R/16, 16 r, 16 k)
        outer = (c // 16, r // 16)
    else:
        c, r = w.shape
        _lowrank_packs(c, r)
        t = w.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)  # (N/16, R/16, 16 n, 16 r)
        outer = (c // 16, r // 16)
    t = t.reshape(*outer, 2, 8, 1, 2, 4, 2).permute(_L_PERM).contiguous()
    return t.view(c, r)


def unpack_lowrank(packed: torch.Tensor, *, down: bool) -> torch.Tensor:
    """Theirs (down [K, R], up [N, R]) -> ours (down [R, K], up [N, R])."""
    c, r = packed.shape
    _lowrank_packs(c, r)
    t = packed.contiguous().view(c // 16, r // 16, 8, 4, 2, 2, 1, 2)
    t = t.permute(_inverse(_L_PERM)).reshape(c // 16, r // 16, 16, 16)
    if down:
        return t.permute(1, 2, 0, 3).reshape(r, c)
    return t.permute(0, 2, 1, 3).reshape(c, r)


# --- AWQ W4A16 (TinyChat) ----------------------------------------------------------------------


def pack_awq_weight(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [N, K] -> their int32 [N/4, K/2]."""
    n, k = codes.shape
    if n % 4 or k % 64:
        raise ValueError(f"AWQ weight [{n}, {k}]: N must be a multiple of 4 and K of 64")
    w = codes.to(torch.int32).view(-1, 4, 8)
    w = w[:, 0] | (w[:, 1] << 4) | (w[:, 2] << 8) | (w[:, 3] << 12)  # [N*K/32, 8] 16-bit words
    w = w.view(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    return w.to(torch.int16).view(torch.int32)


def unpack_awq_weight(packed: torch.Tensor) -> torch.Tensor:
    """Their int32 [N/4, K/2] -> unsigned codes uint8 [N, K]."""
    n4, half_k = packed.shape
    n, k = 4 * n4, 2 * half_k
    w = packed.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [N/4, K]
    w = w.view(n4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(-1, 8)  # [N*K/32, 8]
    nibbles = torch.stack([(w >> s) & 0xF for s in (0, 4, 8, 12)], dim=1)  # [N*K/32, 4, 8]
    return nibbles.reshape(n, k).to(torch.uint8)


def adanorm_order(n: int, chunks: int) -> torch.Tensor:
    """Row ``c * D + d`` of ours is row ``d * chunks + c`` of theirs."""
    d = n // chunks
    return (torch.arange(d).unsqueeze(0) * chunks + torch.arange(chunks).unsqueeze(1)).reshape(-1)


def adanorm_scale_rows(n: int, chunks: int) -> torch.Tensor:
    """Our rows of the ``scale`` chunks (shift, scale, gate, ...), whose bias carries their ``+1``."""
    d = n // chunks
    return torch.cat([torch.arange(c * d, (c + 1) * d) for c in range(1, chunks, 3)])
