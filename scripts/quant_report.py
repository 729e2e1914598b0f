"""Quantization report: output error and storage of each 4-bit scheme on one outlier layer.

    python scripts/quant_report.py [--k 1024 --n 1024 --tokens 512]

The layer has FLUX-like statistics (engine/quant/synthetic.py): a few activation channels
40x larger than the rest and a weight with a decaying singular spectrum. Errors are
measured on held-out tokens, through the reference kernels, with bf16 storage.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.kernels import reference
from engine.modules import W4A16Linear
from engine.quant import SVDQConfig, quantize_svdq, relative_error, search_alpha
from engine.quant.synthetic import outlier_activations, structured_weight


def stored_bytes(tensors: list[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=1024, help="input features (multiple of 64)")
    p.add_argument("--n", type=int, default=1024, help="output features")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (as many held out)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    x_cal = outlier_activations(args.tokens, args.k, seed=args.seed)
    x_test = outlier_activations(args.tokens, args.k, seed=args.seed, sample_seed=args.seed + 1)
    w = structured_weight(args.n, args.k, seed=args.seed)
    y = x_test @ w.T
    n_params = w.numel()

    def w4a4_row(label: str, q, alpha) -> tuple[str, str, float, float]:
        y_q = reference.linear(x_test, q, unsigned=False, act_shift=0.0, group_size=64)
        parts = [q.qweight, q.wscales, q.smooth_factor, q.proj_down, q.proj_up, q.bias]
        return (
            label,
            "-" if alpha is None else f"{alpha:.3f}",
            relative_error(y_q, y),
            stored_bytes(parts) / n_params,
        )

    t0 = time.perf_counter()
    rows = [w4a4_row("naive W4A4", quantize_svdq(w, None, x_cal.abs().amax(0), alpha=None, rank=0), None)]
    for label, rank in [
        ("SmoothQuant W4A4", 0),
        ("SVDQuant W4A4 r=16", 16),
        ("SVDQuant W4A4 r=32", 32),
        ("SVDQuant W4A4 r=64", 64),
    ]:
        q, alpha, _ = search_alpha(w, None, x_cal, SVDQConfig(rank=rank))
        rows.append(w4a4_row(label, q, alpha))
    lin = torch.nn.Linear(args.k, args.n, bias=False)
    lin.weight.data.copy_(w)
    w16 = W4A16Linear.from_linear(lin)
    rows.append(
        (
            "W4A16 (weights only)",
            "-",
            relative_error(w16(x_test), y),
            stored_bytes([w16.qweight, w16.wscales, w16.wzeros]) / n_params,
        )
    )
    rows.append(("BF16", "-", relative_error((x_test.bfloat16() @ w.bfloat16().T).float(), y), 2.0))

    print(
        f"layer K={args.k} N={args.n}, {args.tokens} calibration + {args.tokens} held-out tokens, "
        f"8 outlier channels x40, group 64, bf16 storage ({time.perf_counter() - t0:.1f} s)\n"
    )
    print("| scheme | alpha | rel. output error | bytes/param |")
    print("|---|---|---|---|")
    for label, alpha, err, bpp in rows:
        print(f"| {label} | {alpha} | {err:.4f} | {bpp:.3f} |")


if __name__ == "__main__":
    main()
