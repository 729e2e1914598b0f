"""Datasheet peaks and clocks of the GPUs the models price, in one place.

Three views of the same two chips, each in the form its model reads (the figures are not derived
from each other, so every model's numbers stay as they were calibrated):

- ``A40``: the CUDA model's (scripts/kernel_model.py) per-SM limits of the A40 at its boost clock;
- ``DEVICES``: the Triton models' ``Device`` rows (rates per clock per SM);
- ``IMAGE_PEAKS``: the image model's dense peaks per device name (and PCIe to the host);
- ``ROPE_BANDWIDTH``: the DRAM bandwidths the qk_norm_rope byte model divides by.
"""

from __future__ import annotations

from dataclasses import dataclass

# NVIDIA A40 datasheet (GA102, sm_86): dense tensor peaks, memory bandwidth; boost clock 1740 MHz, 84 SMs.
A40 = {
    "name": "NVIDIA A40",
    "sms": 84,
    "clock_hz": 1.74e9,
    "int4_tops": 598.7e12,
    "bf16_tflops": 149.7e12,
    "dram_bps": 696e9,
    "regs_per_sm": 65536,
    "smem_per_sm": 100 * 1024,
    "max_threads_per_sm": 1536,
    "schedulers": 4,
    "smem_bytes_per_clk": 128,
}


@dataclass(frozen=True)
class Device:
    """Datasheet figures of one GPU (dense tensor rates)."""

    name: str
    cc: int
    sms: int
    clock_ghz: float  # the clock the tensor peaks are quoted at
    int8_macs_per_clk_sm: int
    bf16_fmas_per_clk_sm: int
    dram_gbs: float
    max_threads_sm: int
    smem_kb_sm: int

    def int8_tops(self) -> float:
        return 2 * self.int8_macs_per_clk_sm * self.sms * self.clock_ghz / 1e3

    def bf16_tflops(self) -> float:
        return 2 * self.bf16_fmas_per_clk_sm * self.sms * self.clock_ghz / 1e3


# H100 SXM5: 1979 int8 TOPS / 989 bf16 TFLOPS dense, 3.35 TB/s. A40: 299.3 / 149.7, 696 GB/s.
DEVICES = (
    Device("H100 SXM", 90, 132, 1.83, 4096, 2048, 3350, 2048, 228),
    Device("A40", 86, 84, 1.74, 1024, 512, 696, 1536, 100),
)
H100 = DEVICES[0]

# Datasheet peaks (dense): NVIDIA A40 (GA102) and H100 SXM5. The A40 runs fp16/bf16 tensor math at
# the same rate with fp32 or fp16 accumulation; CPU figures are the host's, for the CPU stages.
IMAGE_PEAKS = {
    "A40": {"bf16": 149.7e12, "int8": 299.3e12, "dram": 696e9, "pcie": 25e9},
    "H100 SXM": {"bf16": 989e12, "int8": 1979e12, "dram": 3.35e12, "pcie": 50e9},
}

ROPE_BANDWIDTH = {"H100 SXM (3.35 TB/s)": 3.35e12, "A40 (0.70 TB/s)": 0.70e12}
