"""Peak GPU memory of one prediction, traced through the real pipeline on the meta device.

    python scripts/memory_report.py [--json PATH] [--markdown]

FLUX.1-schnell's real components are built on the meta device from their configs (nothing is
allocated, nothing computed): the quantized transformer by the checkpoint loader's own
skeleton (engine/flux/checkpoint.py, as ``scripts/count_launches.py`` builds it, with all 19 +
38 blocks), T5-XXL, CLIP-L, the VAE and the safety checker's CLIP ViT-L/14 from the configs
below, every tensor in the dtype the loader leaves it. Then ``FluxGenerator.generate`` (the
serving path: encode, denoise, VAE decode) and the safety checker's device work run on them,
under a dispatch mode that keeps the live bytes of every device tensor (a tensor's storage is
counted from the op that makes it until the last reference to it dies) and records the peak.

What a GPU adds on top, as stated allowances (``ALLOWANCES``):

* allocator rounding: each allocation is rounded as PyTorch's caching allocator rounds it
  (512 B; above 10 MiB, 2 MiB): applied in the trace itself, so the traced peak models
  ``torch.cuda.max_memory_allocated``;
* allocator slack: reserved but unused bytes in cached segments (fragmentation) on top of the
  allocated peak: ``SLACK_FRACTION`` of the peak's transient (non-weight) bytes;
* workspaces: cuBLAS/cuBLASLt and cuDNN workspaces, and the attention kernels' scratch,
  ``WORKSPACE_BYTES``;
* the CUDA context (driver, kernels of torch, Triton and our extension): ``CONTEXT_BYTES``;
  outside torch's allocator, seen by ``nvidia-smi`` and by the card's capacity.

The card needed is the sum. ``scripts/gpu_session.sh`` records ``max_memory_allocated`` for the
same cases where a GPU is lent: the check of the traced figure.

Each memory mode's latency cost is modelled beside it (``latency_model``): bytes moved at the
A40's DRAM bandwidth for the 4-bit T5's dequantization, per-image VAE decode as the same work.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import weakref
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from count_launches import _attention_as_one_launch, full_size_transformer

GiB = 1 << 30
MiB = 1 << 20

# black-forest-labs/FLUX.1-schnell text_encoder_2/config.json (google/t5-v1_1-xxl's encoder).
T5_XXL_CONFIG = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "is_gated_act": True,
    "dense_act_fn": "gelu_new",
}
# black-forest-labs/FLUX.1-schnell text_encoder/config.json (openai/clip-vit-large-patch14's text tower).
CLIP_L_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# black-forest-labs/FLUX.1-schnell vae/config.json.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# CompVis/stable-diffusion-safety-checker config.json: CLIP ViT-L/14 vision tower + projection.
SAFETY_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "quick_gelu",
}
SAFETY_PROJECTION_DIM = 768

# --- allowances beyond the traced live bytes (see the module docstring) -------------------------
# The CUDA context with torch's, Triton's and our kernels loaded lazily (CUDA_MODULE_LOADING=LAZY,
# torch's default): 0.4-0.6 GiB as nvidia-smi shows it for a torch process on Ampere and Hopper.
CONTEXT_BYTES = 600 * MiB
# cuBLAS + cuBLASLt workspaces (32 MiB each per handle on Hopper, torch's default config), cuDNN's
# convolution workspace for the VAE (implicit-GEMM algorithms chosen by heuristics; torch caps
# what it asks for by free memory), flash attention's scratch: a generous round figure.
WORKSPACE_BYTES = 256 * MiB
# Cached-but-unused bytes in the allocator's segments at the peak, as a fraction of the
# transient bytes (weights are allocated once, early, and pack densely).
SLACK_FRACTION = 0.10
ALLOWANCES = {
    "context_bytes": CONTEXT_BYTES,
    "workspace_bytes": WORKSPACE_BYTES,
    "slack_fraction_of_transient": SLACK_FRACTION,
}

# Budgets the small mode must meet (issue 28): the card's memory, context included.
BUDGETS = {1: 12 * GiB, 4: 16 * GiB}


def allocator_bytes(nbytes: int) -> int:
    """What PyTorch's CUDA caching allocator takes for a request: 512 B granules; above 10 MiB
    (kLargeBuffer's cut-off) rounded to 2 MiB."""
    if nbytes == 0:
        return 0
    if nbytes > 10 * MiB:
        return math.ceil(nbytes / (2 * MiB)) * 2 * MiB
    return math.ceil(nbytes / 512) * 512


class LiveBytes(TorchDispatchMode):
    """Live bytes of every tensor on ``device_type`` made by an op, and their peak per stage.

    A storage is counted once (views share it) from the op that returns it until it dies
    (a weakref finalizer on the storage). ``track`` counts tensors made before the mode (the
    weights). ``stage`` labels where the peak falls.
    """

    def __init__(self, device_type: str = "meta") -> None:
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self.stage = "load"
        self.peak_stage = "load"
        self.stage_peaks: dict[str, int] = {}
        self._ids: set[int] = set()

    def track(self, tensors) -> None:
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._ids:
            return
        nbytes = allocator_bytes(storage.nbytes())
        self._ids.add(key)
        self.live += nbytes
        weakref.finalize(storage, self._release, key, nbytes)
        self._note()

    def _release(self, key: int, nbytes: int) -> None:
        self._ids.discard(key)
        self.live -= nbytes

    def _note(self) -> None:
        self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), self.live)
        if self.live > self.peak:
            self.peak, self.peak_stage = self.live, self.stage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            self._add(t)
        return out


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict([*module.named_parameters(), *module.named_buffers()])


def _module_bytes(*modules: torch.nn.Module) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            s = t.untyped_storage()
            if id(s) not in seen:
                seen.add(id(s))
                total += allocator_bytes(s.nbytes())
    return total


# The same components at the tiny model's widths (engine/tiny_model.py), for scripts/gpu_session.py's
# CPU run of the code that measures these cases on a GPU.
TINY_CONFIGS = {
    "t5": {
        "d_model": 64,
        "d_kv": 32,
        "d_ff": 128,
        "num_layers": 1,
        "num_heads": 2,
        "vocab_size": 128,
        "feed_forward_proj": "gated-gelu",
    },
    "clip": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 600,
        "max_position_embeddings": 77,
        "projection_dim": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (16, 16, 16, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    },
    "safety": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "patch_size": 14,
        "image_size": 224,
    },
    "safety_projection_dim": 32,
}


def full_size_pipeline(memory: str, *, tiny: bool = False):
    """FLUX.1-schnell's pipeline on the meta device, in memory mode ``memory``, as the server
    loads it (engine.pipeline.FluxGenerator.from_pretrained's placement and dtypes), and its
    safety checker. Tokenizers are the tiny model's (the token count, not the vocabulary, sets
    the sizes). ``tiny``: the tiny model's widths (``TINY_CONFIGS``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from engine import memory as memory_mode
    from engine.pipeline import FluxGenerator, configure_memory
    from engine.tiny_model import SCHEDULER, TINY_TRANSFORMER, _clip_tokenizer, _t5_tokenizer
    from engine.vae_upsample import use_subpixel_upsampling

    bf16 = torch.bfloat16
    if tiny:
        transformer = full_size_transformer(2, rank=16, config=dict(TINY_TRANSFORMER))
        t5_cfg, clip_cfg, vae_cfg = TINY_CONFIGS["t5"], TINY_CONFIGS["clip"], TINY_CONFIGS["vae"]
        vision_cfg, projection = TINY_CONFIGS["safety"], TINY_CONFIGS["safety_projection_dim"]
    else:
        transformer = full_size_transformer(2, layers=(19, 38))
        t5_cfg, clip_cfg, vae_cfg = T5_XXL_CONFIG, CLIP_L_CONFIG, VAE_CONFIG
        vision_cfg, projection = SAFETY_VISION_CONFIG, SAFETY_PROJECTION_DIM
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    if tiny:  # the tiny tokenizers' special tokens (the real configs name the real ones)
        clip_cfg = {
            **clip_cfg,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**t5_cfg)).to(bf16).eval()
        clip = CLIPTextModel(CLIPTextConfig(**clip_cfg)).to(bf16).eval()
        vae = AutoencoderKL(**vae_cfg).to(bf16).eval()
        use_subpixel_upsampling(vae)  # as FluxGenerator.from_pretrained serves it (8 MB more weights)
        safety = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision_cfg, projection_dim=projection))
        safety = safety.to(torch.float16).eval()  # engine.safety.default_dtype on a GPU
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    mode = memory_mode.Mode(memory)
    configure_memory(pipe, mode, torch.device("meta"))
    pipe.set_progress_bar_config(disable=True)
    return FluxGenerator(pipe, torch.device("meta")), safety, memory_mode.safety_resident(mode)


def component_bytes(gen, safety) -> dict[str, int]:
    pipe = gen.pipe
    return {
        "transformer": _module_bytes(pipe.transformer),
        "t5": _module_bytes(pipe.text_encoder_2),
        "clip": _module_bytes(pipe.text_encoder),
        "vae": _module_bytes(pipe.vae),
        "safety_checker": _module_bytes(safety),
    }


def _clip_processor():
    """CompVis/stable-diffusion-safety-checker's preprocessor (tests/test_safety_input.py's config)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        crop_size=224,
        size=224,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def _staged(tracer: LiveBytes, module: torch.nn.Module, name: str):
    def pre(m, args):
        tracer.stage = name

    return module.register_forward_pre_hook(pre)


def trace_prediction(
    gen, safety, width: int, height: int, num_outputs: int, *, safety_resident: bool = True
) -> dict:
    """Peak live bytes of one prediction (one denoising step: every step allocates the same) and
    the stage it falls in: encode, denoise, decode or safety. ``safety_resident=False``: the
    checker's weights are copied to the device for its check only (engine.memory.OnDemand)."""
    from engine.memory import device_copies
    from engine.safety_input import pixel_values

    pipe = gen.pipe
    tracer = LiveBytes("meta")
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae]
    modules += [safety] if safety_resident else []
    for m in modules:
        tracer.track([*m.parameters(), *m.buffers()])
    weights = tracer.live
    hooks = [
        _staged(tracer, pipe.text_encoder, "encode"),
        _staged(tracer, pipe.text_encoder_2, "encode"),
        _staged(tracer, pipe.transformer, "denoise"),
        _staged(tracer, pipe.vae.decoder, "decode"),
    ]
    try:
        with torch.inference_mode(), _attention_as_one_launch(), tracer:
            # the serving path's images: uint8 on the device (their host copies are not GPU memory)
            images = gen.generate_pixels(
                "a red fox in fresh snow", width=width, height=height, steps=1, num_outputs=num_outputs
            )
            tracer.stage = "safety"
            # engine.safety.SafetyChecker.flags: CLIP's 224x224 crops prepared on the device
            # (engine.safety_input, with the published CLIP processor's settings)
            visiting = None if safety_resident else device_copies(_state(safety), torch.device("meta"))
            clip_input = pixel_values(images, _clip_processor()).to(torch.float16)
            pooled = safety.vision_model(clip_input)[1]
            safety.visual_projection(pooled)
            del images, clip_input, pooled, visiting
    finally:
        for h in hooks:
            h.remove()
    peak = tracer.peak
    transient = peak - weights
    slack = int(SLACK_FRACTION * transient)
    card = peak + slack + WORKSPACE_BYTES + CONTEXT_BYTES
    return {
        "width": width,
        "height": height,
        "num_outputs": num_outputs,
        "weights_bytes": weights,
        "peak_allocated_bytes": peak,
        "peak_stage": tracer.peak_stage,
        "stage_peaks_bytes": dict(tracer.stage_peaks),
        "slack_bytes": slack,
        "card_bytes": card,
    }


# --- the latency cost of each mode, modelled -------------------------------------------------
# A40 (the serving GPU) datasheet DRAM bandwidth; host-to-device copies from pinned memory over
# PCIe 4.0 x16 at the rate such copies reach in practice (32 GB/s raw).
A40_DRAM_BYTES_PER_S = 0.696e12
PCIE_BYTES_PER_S = 24e9
CASES = ((1024, 1024, 1), (1024, 1024, 4), (1536, 640, 1), (1536, 640, 4))  # 1:1 and 21:9 (widest)


def t5_encode_bytes(gen) -> int:
    """DRAM bytes of one T5 encode (every op's inputs read once, outputs written once:
    scripts/count_launches.py's model), 256 tokens."""
    from count_launches import LaunchCounter

    ids = torch.zeros(1, gen.text_tokens, dtype=torch.long, device="meta")
    counter = LaunchCounter()
    with torch.inference_mode(), counter:
        gen.pipe.text_encoder_2(ids, output_hidden_states=False)
    return sum(counter.bytes.values())


def latency_model(gen, safety, safety_resident: bool) -> dict:
    """Per-prediction time a mode spends on its memory savings, at the A40's bandwidths:
    T5's encode traffic (4-bit: dequantizing each weight to bf16 before its matmul) and the
    safety checker's weights copied in for each check. The VAE's one-image-at-a-time decode is
    the same convolutions at batch 1 (each already 1 M output pixels wide): modelled as free."""
    encode = t5_encode_bytes(gen)
    copy = 0 if safety_resident else _module_bytes(safety)
    return {
        "t5_encode_bytes": encode,
        "t5_encode_ms": 1e3 * encode / A40_DRAM_BYTES_PER_S,
        "safety_copy_bytes": copy,
        "safety_copy_ms": 1e3 * copy / PCIE_BYTES_PER_S,
    }


def tiled_decode_work(latent: int = 128, tile: int = 64, overlap: float = 0.25) -> float:
    """Decode work of diffusers' tiled VAE decode relative to one whole decode (the option not
    chosen for the small mode): tiles of ``tile`` latents every ``tile * (1 - overlap)``."""
    stride = int(tile * (1 - overlap))
    covered = sum(min(tile, latent - start) for start in range(0, latent, stride))
    return (covered / latent) ** 2


def report() -> dict:
    out: dict = {"allowances": ALLOWANCES, "budgets": {str(k): v for k, v in BUDGETS.items()}, "modes": {}}
    for mode in ("small", "fast"):
        gen, safety, resident = full_size_pipeline(mode)
        out["modes"][mode] = {
            "components_bytes": component_bytes(gen, safety),
            "safety_resident": resident,
            "cases": [trace_prediction(gen, safety, w, h, n, safety_resident=resident) for w, h, n in CASES],
            "latency": latency_model(gen, safety, resident),
        }
    fast, small = out["modes"]["fast"]["latency"], out["modes"]["small"]["latency"]
    out["small_mode_cost_ms"] = (
        small["t5_encode_ms"] - fast["t5_encode_ms"] + small["safety_copy_ms"] - fast["safety_copy_ms"]
    )
    out["tiled_decode_work"] = tiled_decode_work()
    return out


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def markdown(r: dict) -> str:
    """The table docs/benchmarks.md holds (between the memory_report markers)."""
    lines = [
        "| mode | size | images | weights GiB | peak allocated GiB (stage) | card GiB: + slack, workspaces, "
        "context | budget GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, m in r["modes"].items():
        for c in m["cases"]:
            budget = r["budgets"].get(str(c["num_outputs"])) if mode == "small" else None
            ok = (
                ""
                if budget is None
                else f"{_gib(budget)} ({'met' if c['card_bytes'] <= budget else 'MISSED'})"
            )
            lines.append(
                f"| {mode} | {c['width']}x{c['height']} | {c['num_outputs']} | {_gib(c['weights_bytes'])} | "
                f"{_gib(c['peak_allocated_bytes'])} ({c['peak_stage']}) | **{_gib(c['card_bytes'])}** | {ok} |"
            )
    lines.append("")
    for mode, m in r["modes"].items():
        comp = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in m["components_bytes"].items())
        lat = m["latency"]
        lines.append(
            f"- {mode}: weights (GB) {comp}; safety checker "
            f"{'resident on the GPU' if m['safety_resident'] else 'copied in per check'}; modelled "
            f"T5 encode traffic {lat['t5_encode_bytes'] / 1e9:.1f} GB = {lat['t5_encode_ms']:.1f} ms, "
            f"safety checker copy {lat['safety_copy_ms']:.1f} ms (A40)."
        )
    a = r["allowances"]
    lines.append(
        f"- small mode's modelled latency cost: **{r['small_mode_cost_ms']:.0f} ms per prediction** on an A40; "
        f"the fast mode's: none (it is the reference). A tiled VAE decode (not used) would do "
        f"{r['tiled_decode_work']:.2f}x a whole decode's work."
    )
    lines.append(
        f"- GiB = 2^30 bytes. Allowances: allocator slack {a['slack_fraction_of_transient']:.0%} of the "
        f"transient bytes, workspaces {a['workspace_bytes'] / MiB:.0f} MiB, CUDA context "
        f"{a['context_bytes'] / MiB:.0f} MiB."
    )
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- memory_report.py: begin -->\n", "<!-- memory_report.py: end -->\n"


def docs_block(text: str) -> str:
    """The generated block of a document (between the markers)."""
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--write-docs", type=Path, default=None, help="replace the table in this file (docs/benchmarks.md)"
    )
    args = p.parse_args()
    r = report()
    table = markdown(r)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    if args.write_docs:
        text = args.write_docs.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        args.write_docs.write_text(text[:start] + table + text[end:])


if __name__ == "__main__":
    main()
