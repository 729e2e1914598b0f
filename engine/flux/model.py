"""The quantized transformer as a diffusers citizen: save/load round trip and the LoRA API.

``SVDQFluxTransformer2DModel`` is diffusers' ``FluxTransformer2DModel`` (same ``__init__``,
config, module names and arithmetic) with our linears swapped in by ``load_transformer``.
It overrides what the stock class cannot do for a 4-bit model:

* ``forward`` is diffusers' with the joint (text, image) sequence of the fused single blocks
  formed once, not in every block (see ``forward``);

* ``save_pretrained`` writes our checkpoint format (``svdq-transformer.safetensors``) and a
  ``config.json`` whose ``quantization_config`` names a method diffusers does not know, so
  the stock ``FluxTransformer2DModel.from_pretrained`` refuses the folder loudly instead of
  loading plain layers with random weights;
* ``from_pretrained`` reads it back (or any file of ours), and refuses a folder that is not;
* diffusers' adapter API (``load_lora_adapter``, ``set_adapters``, ``delete_adapters``,
  ``disable_lora``/``enable_lora``, ``unload_lora``, ``active_adapters``) routes to our
  LoRA slots through ``engine.lora``'s manager; fusing into 4-bit weights is refused with
  what to call instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils.peft_utils import apply_lora_scale

from engine.flux import checkpoint
from engine.flux.blocks import FusedFluxSingleTransformerBlock
from engine.flux.checkpoint import CheckpointError, read_metadata, save_checkpoint

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "svdq-transformer.safetensors"
QUANT_METHOD = "svdquant-flux"  # config.json's quantization_config.quant_method
FUSE_MESSAGE = (
    "LoRAs on the 4-bit transformer stay in the 16-bit low-rank branch beside the 4-bit weights; "
    "fusing them into the weights would need re-quantization. Use set_adapters(names, weights) to "
    "change scales, delete_adapters(names) or unload_lora_weights() to remove them."
)


class SVDQFluxTransformer2DModel(FluxTransformer2DModel):
    """FluxTransformer2DModel with SVDQuant linears; built by ``engine.flux.load_transformer``."""

    svdq_config = None  # the SVDQConfig it was quantized with, set by load_transformer
    # diffusers finds blocks by class name (compile_repeated_blocks, device maps): ours too.
    _FUSED: ClassVar[tuple[str, ...]] = ("FusedFluxTransformerBlock", "FusedFluxSingleTransformerBlock")
    _repeated_blocks: ClassVar[list[str]] = [*FluxTransformer2DModel._repeated_blocks, *_FUSED]
    _no_split_modules: ClassVar[list[str]] = [*FluxTransformer2DModel._no_split_modules, *_FUSED]

    @apply_lora_scale("joint_attention_kwargs")  # as diffusers' forward: a PEFT "scale" taken out
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        controlnet_single_block_samples: list[torch.Tensor] | None = None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """diffusers' forward (0.42.1, same arguments and arithmetic), with the fused single blocks
        driven on one joint (text, image) sequence: concatenated once after the double blocks and
        split once after the single blocks, where diffusers' forward hands every single block the two
        streams and each block concatenates them (38 copies of the sequence per step in FLUX.1).
        The joint sequence lives here, not in the blocks, because only the model's loop sees the
        first and the last single block. What this path leaves out (ControlNet residuals, IP-adapter
        embeddings, gradient checkpointing, 3-D ids, diffusers' unfused single blocks of version-1
        files) runs diffusers' forward unchanged."""
        if (
            controlnet_block_samples is not None
            or controlnet_single_block_samples is not None
            or (joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs)
            or (torch.is_grad_enabled() and self.gradient_checkpointing)
            or txt_ids.ndim != 2
            or img_ids.ndim != 2
            or not all(isinstance(b, FusedFluxSingleTransformerBlock) for b in self.single_transformer_blocks)
        ):
            return super().forward(
                hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                joint_attention_kwargs=joint_attention_kwargs,
                controlnet_block_samples=controlnet_block_samples,
                controlnet_single_block_samples=controlnet_single_block_samples,
                return_dict=return_dict,
                controlnet_blocks_repeat=controlnet_blocks_repeat,
            )  # fmt: skip
        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is None:
            temb = self.time_text_embed(timestep, pooled_projections)
        else:
            temb = self.time_text_embed(timestep, guidance.to(hidden_states.dtype) * 1000, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        image_rotary_emb = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        block_kwargs = {"temb": temb, "image_rotary_emb": image_rotary_emb, "joint_attention_kwargs": joint_attention_kwargs}
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **block_kwargs
            )
        text_seq_len = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for block in self.single_transformer_blocks:
            _, joint = block(hidden_states=joint, encoder_hidden_states=None, **block_kwargs)
        output = self.proj_out(self.norm_out(joint[:, text_seq_len:], temb))
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    # --- save / load ----------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """Write ``config.json`` and ``svdq-transformer.safetensors`` (our format) to the folder.

        LoRAs are not part of the model and are not saved. ``push_to_hub``, ``variant`` and
        pickle serialization are not supported (a plain folder of our format is).
        """
        unsupported = {k: v for k, v in kwargs.items() if k in ("push_to_hub", "variant") and v}
        if kwargs.get("safe_serialization", True) is False:
            unsupported["safe_serialization"] = False
        if unsupported or args:
            raise ValueError(f"save_pretrained of the 4-bit transformer does not support {unsupported or args}")
        if self.svdq_config is None:
            raise ValueError("this transformer carries no SVDQConfig; save it with engine.flux.save_checkpoint")
        if self.active_adapters():
            logger.warning("save_pretrained: LoRAs %s are not saved (they are not part of the model)",
                           self.active_adapters())
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self, folder / WEIGHTS_NAME, self.svdq_config)
        config = {k: v for k, v in self.config.items() if k != "_name_or_path"}
        config["_class_name"] = FluxTransformer2DModel.__name__
        config["quantization_config"] = {"quant_method": QUANT_METHOD, "weights": WEIGHTS_NAME}
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        subfolder: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> SVDQFluxTransformer2DModel:
        """Load a folder written by ``save_pretrained`` (or one checkpoint file of ours).

        ``dtype`` sets the 16-bit remainder (embedders, norms); quantized buffers keep their
        stored types. A folder without our weights file is refused, naming what it holds.
        """
        if kwargs:
            raise ValueError(f"from_pretrained of the 4-bit transformer does not take {sorted(kwargs)}")
        path = Path(pretrained_model_name_or_path)
        if subfolder:
            path = path / subfolder
        if path.is_dir():
            if not (path / WEIGHTS_NAME).exists():
                held = sorted(p.name for p in path.iterdir())[:8]
                raise CheckpointError(
                    f"{path}: no {WEIGHTS_NAME}, so not a folder written by SVDQFluxTransformer2DModel."
                    f"save_pretrained (it holds {held}); a float diffusers transformer loads with "
                    "diffusers.FluxTransformer2DModel.from_pretrained and is quantized by scripts/quantize_flux.py"
                )
            _check_config(path)
            path = path / WEIGHTS_NAME
        elif not path.is_file():
            raise FileNotFoundError(f"{path}: no such folder or file")
        model = load_transformer(path, device)
        if dtype is not None:
            for p in model.parameters():
                p.data = p.data.to(dtype)
        return model

    # --- diffusers' adapter API, routed to our LoRA slots -----------------------------------------

    def _lora_state(self) -> tuple[dict, dict, object]:
        """(loaded adapters name -> ParsedLora, active name -> scale, the LoraManager), made on first use."""
        state = self.__dict__.get("_svdq_lora")
        if state is None:
            from engine.lora import LoraManager

            state = ({}, {}, LoraManager(self))
            self.__dict__["_svdq_lora"] = state
        return state

    def _apply_active(self, active: dict[str, float]) -> None:
        adapters, current, manager = self._lora_state()
        manager.set([(name, adapters[name], scale) for name, scale in active.items()])
        current.clear()
        current.update(active)

    def load_lora_adapter(
        self, pretrained_model_name_or_path_or_dict, prefix: str | None = "transformer", hotswap: bool = False, **kwargs
    ) -> None:
        """Read a LoRA (state dict, local file or folder, or hub id) and activate it at scale 1.

        Any format ``engine.lora`` reads (diffusers/PEFT, kohya, ComfyUI, XLabs). The adapter
        joins the active ones; ``hotswap=True`` replaces an adapter of the same name in place.
        """
        from engine.lora import parse_lora

        adapters, active, _ = self._lora_state()
        name = kwargs.pop("adapter_name", None) or f"default_{len(adapters)}"
        if name in adapters and not hotswap:
            raise ValueError(f"adapter {name!r} is already loaded; delete_adapters({name!r}) first or pass hotswap=True")
        if kwargs.get("network_alphas"):
            raise ValueError(
                "network_alphas are not supported here: pass the LoRA file or its state dict with its "
                "'.alpha' keys, which engine.lora reads"
            )
        parsed = parse_lora(_read_lora_source(pretrained_model_name_or_path_or_dict, kwargs), self)
        adapters[name] = parsed
        try:
            self._apply_active({**active, name: active.get(name, 1.0)})
        except Exception:
            del adapters[name]
            raise

    def set_adapters(self, adapter_names: str | list[str], weights=None) -> None:
        """Activate exactly ``adapter_names`` with ``weights`` (a float, or one per adapter; default 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if weights is None or isinstance(weights, int | float):
            weights = [1.0 if weights is None else float(weights)] * len(names)
        weights = list(weights)
        if any(not isinstance(w, int | float) for w in weights):
            raise ValueError("per-block LoRA weights (dicts) are not supported: give one float per adapter")
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter(s) but {len(weights)} weight(s)")
        adapters, _, _ = self._lora_state()
        missing = [n for n in names if n not in adapters]
        if missing:
            raise ValueError(f"no adapter named {missing}; loaded: {sorted(adapters)}")
        self._apply_active(dict(zip(names, map(float, weights), strict=True)))

    def active_adapters(self) -> list[str]:
        return list(self._lora_state()[1])

    def get_adapter_scales(self) -> dict[str, float]:
        return dict(self._lora_state()[1])

    def loaded_adapters(self) -> list[str]:
        return list(self._lora_state()[0])

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        adapters, active, _ = self._lora_state()
        self._apply_active({n: s for n, s in active.items() if n not in names})
        for n in names:
            adapters.pop(n, None)

    def disable_lora(self) -> None:
        """Run the base model; ``enable_lora`` brings the same adapters and scales back."""
        self.__dict__["_svdq_disabled"] = self.get_adapter_scales() or self.__dict__.get("_svdq_disabled", {})
        self._apply_active({})

    def enable_lora(self) -> None:
        self._apply_active(self.__dict__.pop("_svdq_disabled", None) or self.get_adapter_scales())

    def unload_lora(self) -> None:
        adapters, _, _ = self._lora_state()
        self._apply_active({})
        adapters.clear()

    def fuse_lora(self, *args, **kwargs) -> None:
        raise NotImplementedError(FUSE_MESSAGE)

    def unfuse_lora(self, *args, **kwargs) -> None:
        raise NotImplementedError(FUSE_MESSAGE)

    def add_adapter(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "PEFT adapters (for training) cannot wrap 4-bit layers; load a trained LoRA with "
            "load_lora_adapter(...) or the pipeline's load_lora_weights(...)"
        )

    def save_lora_adapter(self, *args, **kwargs) -> None:
        raise NotImplementedError("the LoRAs are the files they were loaded from; save those files")


def _check_config(folder: Path) -> None:
    """config.json, when present, must be ours and describe the same architecture as the file."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text())
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{cfg_path}: quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}")
    metadata, _ = read_metadata(folder / WEIGHTS_NAME)
    stored = json.loads(metadata.get("transformer_config", "{}"))
    differ = sorted(
        k for k, v in stored.items() if not k.startswith("_") and k in cfg and json.dumps(cfg[k]) != json.dumps(v)
    )
    if differ:
        raise CheckpointError(f"{folder}: config.json and {WEIGHTS_NAME} disagree on {differ}")


def _read_lora_source(source, kwargs: dict) -> dict[str, torch.Tensor]:
    """A LoRA state dict from a dict, a local file or folder (``weight_name``), or a hub id."""
    from engine.lora import LoraError, read_lora

    if isinstance(source, dict):
        return dict(source)
    path = Path(source).expanduser()
    if path.is_file():
        return read_lora(path)
    if path.is_dir():
        weight_name = kwargs.get("weight_name")
        files = [path / weight_name] if weight_name else sorted(path.glob("*.safetensors"))
        if len(files) != 1 or not files[0].is_file():
            raise LoraError(f"{path}: pass weight_name=... (found {[f.name for f in files]})")
        return read_lora(files[0])
    # Not local: a hub id, fetched and converted by diffusers itself.
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    allowed = ("weight_name", "cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
    return FluxLoraLoaderMixin.lora_state_dict(str(source), **{k: v for k, v in kwargs.items() if k in allowed})


def load_transformer(path: str | Path, device: torch.device | str = "cpu") -> SVDQFluxTransformer2DModel:
    """Our checkpoint (or the public engine's INT4 file) as an ``SVDQFluxTransformer2DModel``,
    built directly on ``device`` (see engine.flux.checkpoint.load_transformer)."""
    return checkpoint.load_transformer(path, device, model_class=SVDQFluxTransformer2DModel)
