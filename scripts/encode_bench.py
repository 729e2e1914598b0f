"""Time Pillow's encoders on a 1-megapixel image: WebP per method, JPEG, PNG.

    python scripts/encode_bench.py [--image photo.png] [--repeat 5] [--json]

Without ``--image`` the picture is synthetic but photo-like (smooth gradients, soft shapes,
fine texture and hard edges), not noise: noise is the worst case for every codec and not
what FLUX makes. Reports the best of ``--repeat`` runs per setting and the file size.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image, ImageFilter

from engine.service.outputs import FORMATS, WEBP_METHOD


def photo_like(size: int = 1024, seed: int = 0) -> Image.Image:
    """Gradients + blurred blobs + a little grain + a few hard-edged shapes, RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.6 * x + 0.2, 0.5 * y + 0.3 * x, 0.8 - 0.5 * y], axis=-1)
    blobs = rng.random((size // 32, size // 32, 3))
    blobs = np.asarray(Image.fromarray((blobs * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
    img = 0.55 * base + 0.4 * blobs / 255.0 + rng.normal(0, 0.02, (size, size, 3))
    out = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    mandel = Image.effect_mandelbrot((size // 2, size // 2), (-2.0, -1.2, 0.8, 1.2), 64).convert("RGB")
    out.paste(mandel, (size // 4, size // 4))
    return out


def encode_seconds(img: Image.Image, repeat: int, **kwargs) -> tuple[float, float, int, float]:
    """Best wall and CPU time of ``repeat`` encodes, the file size, and the decoded PSNR in dB.

    CPU time (``process_time``, one thread) is the encoder's work; wall time also counts
    waiting for a core, which on a shared machine can be several times more.
    """
    best, best_cpu, buf = float("inf"), float("inf"), io.BytesIO()
    for _ in range(repeat):
        buf = io.BytesIO()
        t0, c0 = time.perf_counter(), time.process_time()
        img.save(buf, **kwargs)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    decoded = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((decoded - np.asarray(img, dtype=np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    return best, best_cpu, buf.tell(), psnr


def parallel_seconds(img: Image.Image, n: int, **kwargs) -> float:
    """Wall time to encode ``n`` copies in ``n`` threads (Pillow releases the GIL while encoding)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda _: img.save(io.BytesIO(), **kwargs), range(n)))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", help="an image to encode instead of the synthetic one")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    img = Image.open(args.image).convert("RGB") if args.image else photo_like()
    rows = []

    def row(setting: dict, **kwargs) -> None:
        s, cpu, n, psnr = encode_seconds(img, args.repeat, **kwargs)
        rows.append(
            {**setting, "ms": round(s * 1e3, 1), "cpu_ms": round(cpu * 1e3, 1), "bytes": n, "psnr_db": round(psnr, 2)}
        )

    for method in range(7):
        row({"format": "webp", "method": method}, format="WEBP", quality=args.quality, method=method)
    row({"format": "jpg"}, format=FORMATS["jpg"], quality=args.quality)
    for level in (1, 6):
        row({"format": "png", "compress_level": level}, format="PNG", compress_level=level)
    webp = {"format": "WEBP", "quality": args.quality, "method": WEBP_METHOD}
    four = {"serial_ms": round(sum(encode_seconds(img, 1, **webp)[0] for _ in range(4)) * 1e3, 1),
            "threads_ms": round(parallel_seconds(img, 4, **webp) * 1e3, 1)}
    if args.json:
        print(json.dumps({"size": img.size, "quality": args.quality, "served_webp_method": WEBP_METHOD,
                          "rows": rows, "four_images": four}))
        return
    print(f"{img.size[0]}x{img.size[1]}, quality {args.quality}, best of {args.repeat} (served: webp method {WEBP_METHOD})")
    for r in rows:
        setting = {k: v for k, v in r.items() if k not in ("ms", "cpu_ms", "bytes", "psnr_db")}
        print(
            f"  {setting!s:42} cpu {r['cpu_ms']:7.1f} ms  wall {r['ms']:7.1f} ms "
            f"{r['bytes'] / 1024:7.1f} KiB  PSNR {r['psnr_db']:.2f} dB"
        )
    print(f"  4 images, webp method {WEBP_METHOD}: one after another {four['serial_ms']} ms, "
          f"4 threads {four['threads_ms']} ms")


if __name__ == "__main__":
    main()
