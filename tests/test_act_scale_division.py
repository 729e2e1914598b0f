"""quantize_act's group scale on the GPU, ``RN(amax / QMAX)`` by Markstein's correction from the
constant ``RN(1 / QMAX)`` (engine/kernels/triton/act.py, _quantize_group), against IEEE division.

The three operations are evaluated here in exact rational arithmetic with one fp32 rounding each
(what ``mul.rn`` and ``fma.rn`` do, subnormals kept), over amax from the smallest subnormal to
the largest finite fp32, both QMAX (7 signed, 15 unsigned); the division it replaces is the
correctly rounded quotient, also exact here. The same PTX runs in tests/test_ptx_exec_triton.py.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from engine.kernels.triton import act


def _rn32(x: Fraction) -> np.float32:
    """x rounded to the nearest fp32, ties to even (subnormals kept, no overflow here)."""
    f = np.float32(float(x))  # within one fp32 ulp of x; then pick the nearest of f and its neighbours
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - x), int(c.view(np.uint32)) & 1))
    return np.float32(best)


def _markstein(a: np.float32, qmax: float, rq: float) -> np.float32:
    fa, fq, frq = Fraction(float(a)), Fraction(qmax), Fraction(rq)
    q = _rn32(fa * frq)
    r = _rn32(Fraction(float(q)) * -fq + fa)
    return _rn32(Fraction(float(r)) * frq + Fraction(float(q)))


def _samples(n: int) -> np.ndarray:
    g = np.random.default_rng(0)
    bits = g.integers(1, 0x7F7FFFFF, n, dtype=np.uint32)  # every positive finite fp32
    sub = g.integers(1, 0x00800000, n // 8, dtype=np.uint32)  # subnormals
    edge = np.array([1, 2, 3, 7, 15, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x3F800000], dtype=np.uint32)
    return np.concatenate([bits, sub, edge]).view(np.float32)


@pytest.mark.parametrize("qmax, rq", [(7.0, act._RCP_QMAX_S.value), (15.0, act._RCP_QMAX_U.value)])
def test_group_scale_division_is_ieee(qmax, rq):
    assert rq == float(_rn32(Fraction(1) / Fraction(qmax)))  # the constant is RN(1 / QMAX)
    for a in _samples(3000):
        want = _rn32(Fraction(float(a)) / Fraction(qmax))
        got = _markstein(a, qmax, rq)
        assert got.view(np.uint32) == want.view(np.uint32), (float(a), float(got), float(want))
    assert _markstein(np.float32(0.0), qmax, rq) == 0.0
