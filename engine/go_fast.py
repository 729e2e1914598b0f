"""go_fast: the transformer under torch.compile, every compile counted, logged and bounded.

What gets compiled and when (see docs/architecture.md for the measured counts):

* regional compilation, as diffusers' ``compile_repeated_blocks`` does: each repeated block
  (the 19 double and 38 single transformer blocks of FLUX.1) gets
  ``torch.compile(fullgraph=True, dynamic=True)`` on its forward, in place, and the embedders,
  final norm and projection stay eager. Blocks of one class share their code, and dynamo
  inlines their parameters as graph inputs, so the graphs of a block class serve every block of
  it: the compile traces one double and one single block instead of the whole model (57
  blocks), which is what makes it cheap enough for a cold start. Every single block gets the
  joint (text, image) sequence as one contiguous tensor (SVDQFluxTransformer2DModel.forward
  forms it once), so one graph per shape serves them all (counted on the tiny model: 2 graphs
  per shape class, 1 double + 1 single). Switching go_fast off for a
  request runs the same modules with ``torch.compiler.set_stance("force_eager")``
  (:meth:`GoFast.disabled`);
* the image sequence length (the output size) and the batch are symbolic, so every size x
  batch combination the inputs allow shares a graph. Batch 1 is specialised by torch (sizes 0
  and 1 always are), so batch 1 and batch 2-4 are two shape classes (4 graphs). Parameters and
  buffers keep static shapes (torch's default, which keeps the weights' kernels specialised),
  so a LoRA, whose factors widen the low-rank buffers, adds 4 graphs per distinct LoRA rank;
* ``FluxService.warm_up()`` compiles the base graphs at setup (default size, batch 1 first),
  so no request pays a compile unless it brings a shape nothing has covered (a new LoRA
  rank); that compile is logged with its shape and time, as a warning;
* the recompile limit is raised (64 per block class: the base graphs and 31 LoRA ranks; 20 on
  Hopper, where the W4A8 route's M guard gives the double blocks a third class) and a recompile past
  it raises ``GoFastError`` naming the shape (``fail_on_recompile_limit_hit``) instead of
  torch's default silent fall-back to eager; the service then runs that request eagerly and
  says so in a warning.

The backend is injectable (``inductor`` on a GPU; ``aot_eager`` or ``inductor`` in CPU tests).

Attention: go_fast requests use ``CompileSettings.attention`` (``auto``: SageAttention's 8-bit
QK^T where the GPU, dtype and head dim allow it, else SDPA; engine.flux.attention), chosen and
logged once at setup by :func:`select_attention`; requests with go_fast off, and every request
on a machine without go_fast, use SDPA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Graphs per compiled code object (the limit counts per block class): 2 (batch 1 and 2-4), 2 more
# per distinct LoRA rank; 64 allows 31 LoRA ranks (15 when the single blocks took two graphs per
# shape, before issue 26). Where the W4A8 route serves (Hopper) its M guard splits the double
# blocks' batch-1 class in two (a 0.25-megapixel image stream stays W4A4): 3 per rank, 20 ranks.
# torch's default is 8.
RECOMPILE_LIMIT = 64


class GoFastError(RuntimeError):
    """A request needed a compile past the recompile limit (torch would have run it eagerly)."""


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """How go_fast compiles; the serving default is inductor with autotuning, no CUDA graphs."""

    backend: str = "inductor"
    mode: str | None = "max-autotune-no-cudagraphs"
    dynamic: bool = True
    recompile_limit: int = RECOMPILE_LIMIT
    attention: str = "auto"  # go_fast's attention (engine.flux.attention.KINDS): auto, sage, sdpa
    # The VAE decoder (compile_vae_decoder): compiled, dynamic over sizes, in inductor's default
    # mode: its gain is the fused GroupNorm/SiLU/add glue, its convolutions stay cuDNN's, so
    # autotuning would lengthen the cold start for little.
    vae: bool = True
    vae_mode: str | None = None


@dataclasses.dataclass
class CompileRecord:
    shape: str  # what the request asked for, e.g. "1024x1024 x1, LoRA rank 16"
    graphs: int  # graphs compiled during that call
    seconds: float  # wall time of the call that compiled (compile + the run itself)
    at_setup: bool


def configure_compiler(settings: CompileSettings) -> None:
    """Process-wide dynamo settings, called once from setup(): a raised limit that fails loudly."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, settings.recompile_limit)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # No "duck shaping": by default two input dimensions of equal size share one symbol, so a
    # warm-up at 1024x1024 (4096 image tokens) would tie the image sequence to T5's width
    # (4096) and the next size would recompile; with it off every dimension is its own symbol.
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False


def select_attention(transformer: nn.Module, settings: CompileSettings | None) -> str:
    """Choose, once at setup, the attention go_fast's requests use; logged with its reason.

    ``settings.attention`` where go_fast is configured (None: go_fast off, SDPA). Where sage is
    chosen, diffusers' FluxAttention modules get a processor that calls
    ``engine.flux.attention.attend`` (our own block forwards call it directly). Returns the
    backend, ``"sage"`` or ``"sdpa"``; the service runs go_fast-off requests with SDPA.
    """
    from engine.flux import attention

    kind = settings.attention if settings is not None else "sdpa"
    note = "for go_fast requests; go_fast off: sdpa" if settings is not None else "no go_fast here"
    device = next(transformer.parameters()).device
    dtype = transformer.dtype  # diffusers: the first floating-point parameter's (not a packed code's)
    head_dim = transformer.config.attention_head_dim
    chosen = attention.configure(kind, device, dtype=dtype, head_dim=head_dim, note=note)
    if chosen == "sage":
        changed = attention.install_processor(transformer)
        logger.info(
            "go_fast: attention through engine.flux.attention in %d diffusers attention module(s)", changed
        )
    return chosen


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (all callers), from its own counters."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _compile_kwargs(settings: CompileSettings) -> dict:
    kwargs: dict = {"backend": settings.backend, "dynamic": settings.dynamic, "fullgraph": True}
    if settings.backend == "inductor" and settings.mode:
        kwargs["mode"] = settings.mode
    return kwargs


def compile_vae_decoder(vae: nn.Module, settings: CompileSettings) -> nn.Module:
    """Compile the VAE's decoder in place (``nn.Module.compile``), the whole of it as one graph,
    dynamic over its spatial sizes; returns the decoder.

    ``vae.decode`` (one image at a time: diffusers' sliced decode, engine.pipeline) calls
    ``vae.decoder`` on a ``[1, 16, H/8, W/8]`` latent, so the batch is always 1 and the height
    and width are the only varying dimensions: one dynamic graph serves every served size,
    where a static compile would take one graph per size (22). The decoder already runs in
    channels_last on CUDA (engine.pipeline), which the compiled graph keeps. Counted on CPU with
    inductor (tests/test_go_fast_vae.py): 2 graphs over the 22 served sizes, split by a CPU-only
    guard (the CPU convolution backend is chosen by input size); on the meta device, without
    backend guards, 1.
    """
    kwargs: dict = {"backend": settings.backend, "dynamic": True, "fullgraph": True}
    if settings.backend == "inductor" and settings.vae_mode:
        kwargs["mode"] = settings.vae_mode
    vae.decoder.compile(**kwargs)
    return vae.decoder


def compiled_vae(vae: nn.Module | None, settings: CompileSettings) -> nn.Module | None:
    """``vae`` with its decoder compiled in place where ``settings.vae`` asks for it, else None."""
    if vae is None or not settings.vae:
        return None
    compile_vae_decoder(vae, settings)
    return vae


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's repeated blocks: modules of a class named in its ``_repeated_blocks``
    (diffusers' declaration; FLUX: FluxTransformerBlock, FluxSingleTransformerBlock), matched
    through the class hierarchy so that our fused subclasses count."""
    names = set(getattr(type(transformer), "_repeated_blocks", None) or ())
    return [m for m in transformer.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def compile_repeated_blocks(transformer: nn.Module, settings: CompileSettings) -> int:
    """Compile every repeated block's forward in place (``nn.Module.compile``); returns how many.

    Our equivalent of diffusers' ``ModelMixin.compile_repeated_blocks``, which matches blocks by
    class *name* and so would miss our fused subclasses.
    """
    blocks = repeated_blocks(transformer)
    if not blocks:
        raise GoFastError(f"{type(transformer).__name__} declares no repeated blocks to compile")
    for block in blocks:
        block.compile(**_compile_kwargs(settings))
    return len(blocks)


class GoFast:
    """One transformer with its repeated blocks compiled in place (and, given ``vae``, the VAE's
    decoder), and a log of every compile.

    ``compiled`` and ``eager`` are the same module; a request without go_fast runs inside
    :meth:`disabled`, where every compiled block, and the compiled decoder, runs its eager forward.
    """

    def __init__(
        self, transformer: nn.Module, settings: CompileSettings | None = None, *, vae: nn.Module | None = None
    ) -> None:
        self.settings = settings or CompileSettings()
        self.eager = transformer
        self.blocks = compile_repeated_blocks(transformer, self.settings)
        self.vae = compiled_vae(vae, self.settings)
        self.compiled = transformer
        self.records: list[CompileRecord] = []

    @staticmethod
    @contextlib.contextmanager
    def disabled() -> Iterator[None]:
        """Run the compiled blocks' (and decoder's) eager forwards (go_fast off) without undoing
        the compile: the stance holds for every compiled code object of the process."""
        with torch.compiler.set_stance("force_eager"):
            yield

    def warm_up_vae(self, sizes: Iterable[tuple[int, int]]) -> None:
        """Decode one random latent at each ``(width, height)`` at setup, so that no request
        compiles the decoder: where one dynamic graph covers them all this costs one decode per
        size; a graph that a backend guard splits off is compiled here, counted and logged."""
        if self.vae is None:
            return
        p = next(self.vae.parameters())
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # diffusers' vae_scale_factor
        with torch.inference_mode():
            for width, height in sizes:
                z = torch.randn(
                    1,
                    self.vae.config.latent_channels,
                    height // factor,
                    width // factor,
                    device=p.device,
                    dtype=p.dtype,
                )
                try:
                    with self.track(f"VAE decode {width}x{height}", at_setup=True):
                        self.vae.decode(z, return_dict=False)
                except GoFastError as e:  # such a request falls back to eager (FluxService)
                    logger.warning("%s; go_fast requests of this size will run eagerly", e)

    @property
    def graphs(self) -> int:
        return sum(r.graphs for r in self.records)

    @contextlib.contextmanager
    def track(self, shape: str, *, at_setup: bool = False) -> Iterator[None]:
        """Count and time the compiles of the calls inside; a limit hit becomes GoFastError."""
        before, t0 = graphs_compiled(), time.perf_counter()
        try:
            yield
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise GoFastError(
                f"go_fast: {shape} needs a new compiled graph past the recompile limit "
                f"({torch._dynamo.config.recompile_limit} graphs; raise CompileSettings.recompile_limit)"
            ) from e
        new = graphs_compiled() - before
        if new:
            seconds = time.perf_counter() - t0
            self.records.append(CompileRecord(shape, new, seconds, at_setup))
            log = logger.info if at_setup else logger.warning
            log(
                "go_fast: compiled %d graph(s) for %s in %.1f s (%s; %d graph(s) so far)",
                new,
                shape,
                seconds,
                "setup" if at_setup else "during a request: a shape setup did not cover",
                self.graphs,
            )


def lora_rank(transformer: nn.Module) -> int:
    """The widest LoRA rank now set on any quantized layer (0: none), for log lines."""
    from engine.modules import SVDQLinear, W4A16Linear

    ranks = [
        sum(d.shape[0] for d in (t[0] for t in m._loras.values()))
        for m in transformer.modules()
        if isinstance(m, SVDQLinear | W4A16Linear) and m._loras
    ]
    return max(ranks, default=0)


def shape_label(width: int, height: int, batch: int, transformer: nn.Module | None = None) -> str:
    rank = lora_rank(transformer) if transformer is not None else 0
    return f"{width}x{height} x{batch}" + (f", LoRA rank {rank}" if rank else "")


def transformer_inputs(
    transformer: nn.Module, width: int, height: int, batch: int, text_tokens: int = 256
) -> dict:
    """Random inputs of the shapes FluxPipeline gives the transformer at this size and batch.

    For compiling and counting graphs without running the text encoders and the VAE.
    """
    cfg = transformer.config
    seq = (width // 16) * (height // 16)  # VAE factor 8 x 2x2 latent packing
    dtype = next(transformer.parameters()).dtype
    device = next(transformer.parameters()).device
    kw = {"dtype": dtype, "device": device}
    return {
        "hidden_states": torch.randn(batch, seq, cfg.in_channels, **kw),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.joint_attention_dim, **kw),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, **kw),
        "timestep": torch.full((batch,), 0.5, **kw),
        "img_ids": torch.zeros(seq, 3, **kw),
        "txt_ids": torch.zeros(text_tokens, 3, **kw),
        "guidance": torch.full((batch,), 3.5, **kw) if cfg.guidance_embeds else None,
        "return_dict": False,
    }
