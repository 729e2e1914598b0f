"""FLUX LoRAs on the 4-bit transformer, without re-quantizing anything.

Read: diffusers/PEFT (``transformer.<module>.lora_A/lora_B``), kohya (``lora_unet_<bfl_name>
.lora_down/lora_up`` + ``.alpha``), ComfyUI (BFL module names, optionally under
``diffusion_model.``, with ``lora_A/lora_B`` or ``lora_down/lora_up`` + ``.alpha``) and XLabs
(``<block>.processor.{qkv,proj}_lora{1,2}.down/up``). Every file becomes a list of
``(diffusers module, down [r, K], up [N, r], alpha/rank)``; LoRAs trained on BFL's fused layers
are split the way diffusers splits the model: ``qkv`` rows into q, k, v (the down factor is
shared), the single block's ``linear1`` into q, k, v and ``proj_mlp``, and the single block's
``proj_out`` input columns into its attention and GELU parts.

Apply: on SVDQLinear and W4A16Linear a LoRA widens the 16-bit low-rank branch; on a layer that
stays 16-bit (embedders, output projection) it is merged into the float weight, and the
original weight tensor is kept to restore it bit for bit. Keys that match nothing are reported
in one log line; text-encoder keys are reported, not applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from engine.flux.layers import SplitInputLinear
from engine.modules import SVDQLinear, W4A16Linear
from engine.weights import WeightFile, WeightsError, ensure_files

logger = logging.getLogger(__name__)


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the model is left as it was."""


@dataclasses.dataclass
class LoraFactor:
    module: str  # diffusers module name in the transformer
    down: torch.Tensor  # [r, K] fp32
    up: torch.Tensor  # [N, r] fp32
    scale: float  # alpha / rank (1 where the format has no alpha)
    key: str  # the file's key it came from, for error messages


@dataclasses.dataclass
class ParsedLora:
    format: str
    factors: list[LoraFactor]
    unmatched: list[str]
    text_encoder: list[str]


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise LoraError(f"{path.name}: not a readable .safetensors LoRA file ({e})") from e


# --- BFL (original FLUX) module names -> diffusers modules --------------------------------------


def _bfl_table(model: nn.Module) -> dict[str, list[tuple[str, slice | None]]]:
    """``bfl name -> [(diffusers module, rows of the fused up factor it takes)]``."""
    d = model.config.num_attention_heads * model.config.attention_head_dim
    table: dict[str, list[tuple[str, slice | None]]] = {
        "img_in": [("x_embedder", None)],
        "txt_in": [("context_embedder", None)],
        "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", None)],
        "time_in.out_layer": [("time_text_embed.timestep_embedder.linear_2", None)],
        "vector_in.in_layer": [("time_text_embed.text_embedder.linear_1", None)],
        "vector_in.out_layer": [("time_text_embed.text_embedder.linear_2", None)],
        "final_layer.linear": [("proj_out", None)],
        "final_layer.adaLN_modulation.1": [("norm_out.linear", None)],  # (shift, scale) -> (scale, shift)
    }
    qkv = [slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)]
    for i in range(model.config.num_layers):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, names, mlp, mod in (
            ("img", ("to_q", "to_k", "to_v"), "ff", "norm1"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context", "norm1_context"),
        ):
            table[f"{b}.{stream}_attn.qkv"] = [(f"{t}.attn.{n}", s) for n, s in zip(names, qkv, strict=True)]
            table[f"{b}.{stream}_attn.proj"] = [
                (f"{t}.attn.{'to_out.0' if stream == 'img' else 'to_add_out'}", None)
            ]
            table[f"{b}.{stream}_mlp.0"] = [(f"{t}.{mlp}.net.0.proj", None)]
            table[f"{b}.{stream}_mlp.2"] = [(f"{t}.{mlp}.net.2", None)]
            table[f"{b}.{stream}_mod.lin"] = [(f"{t}.{mod}.linear", None)]
    for i in range(model.config.num_single_layers):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        mlp = model.get_submodule(t).mlp_hidden_dim
        table[f"{b}.linear1"] = [
            (f"{t}.attn.{n}", s) for n, s in zip(("to_q", "to_k", "to_v"), qkv, strict=True)
        ] + [(f"{t}.proj_mlp", slice(3 * d, 3 * d + mlp))]
        table[f"{b}.qkv"] = table[f"{b}.linear1"][:3]  # XLabs: only the attention part of linear1
        table[f"{b}.linear2"] = [(f"{t}.proj_out", None)]
        table[f"{b}.modulation.lin"] = [(f"{t}.norm.linear", None)]
    return table


_XLABS = {
    "qkv_lora1": "img_attn.qkv",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "proj_lora2": "txt_attn.proj",
    "qkv_lora": "qkv",
    "proj_lora": "linear2",
}
_TEXT_ENCODER = ("lora_te", "text_encoder", "te1.", "te2.", "t5xxl", "clip_l")


def detect_format(keys: list[str]) -> str:
    if any(".processor." in k and "_lora" in k for k in keys):
        return "xlabs"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(re.search(r"(^|\.)(double_blocks|single_blocks|final_layer|img_in|txt_in)\.", k) for k in keys):
        return "comfyui"
    return "diffusers"


def _pairs(state: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """``module key -> {"down", "up", "alpha"?}`` in the file's own module naming, + leftover keys."""
    patterns = {
        "xlabs": r"(.+)\.(down|up)\.weight",
        "kohya": r"(.+)\.(lora_down|lora_up)\.weight|(.+)\.(alpha)",
    }.get(fmt, r"(.+)\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)\.weight|(.+)\.(alpha)")
    roles = {
        "down": "down",
        "lora_A": "down",
        "lora_down": "down",
        "lora.down": "down",
        "up": "up",
        "lora_B": "up",
        "lora_up": "up",
        "lora.up": "up",
        "alpha": "alpha",
    }
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    leftover = []
    for key, value in state.items():
        m = re.fullmatch(patterns, key)
        if not m:
            leftover.append(key)
            continue
        base, role = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        pairs.setdefault(base, {})[roles[role]] = value
    return pairs, leftover


def _to_bfl(base: str, fmt: str) -> str:
    if fmt == "kohya":
        return base.removeprefix("lora_unet_")  # still underscore-joined; matched against the table below
    base = base.removeprefix("diffusion_model.")
    if fmt == "xlabs":
        m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)", base)
        if m and m.group(3) in _XLABS:
            return f"{m.group(1)}.{m.group(2)}.{_XLABS[m.group(3)]}"
    return base


def parse_lora(state: dict[str, torch.Tensor], model: nn.Module) -> ParsedLora:
    """Map a LoRA state dict onto ``model``'s modules; raises LoraError if nothing matches."""
    fmt = detect_format(list(state))
    pairs, leftover = _pairs(state, fmt)
    table = _bfl_table(model)
    kohya_names = {name.replace(".", "_"): name for name in table}
    modules = dict(model.named_modules())
    factors, unmatched, text_encoder = [], list(leftover), []
    for base, parts in pairs.items():
        if base.startswith(_TEXT_ENCODER):
            text_encoder.append(base)
            continue
        if "down" not in parts or "up" not in parts:
            unmatched.append(base)
            continue
        down, up = parts["down"].float(), parts["up"].float()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"{base}: down {list(down.shape)} and up {list(up.shape)} are not a LoRA pair")
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        if fmt == "diffusers":
            name = re.sub(r"^(base_model\.model\.|transformer\.)+", "", base)
            if isinstance(modules.get(name), nn.Linear | SVDQLinear | W4A16Linear | SplitInputLinear):
                factors.append(LoraFactor(name, down, up, scale, base))
            else:
                unmatched.append(base)
            continue
        bfl = _to_bfl(base, fmt)
        bfl = kohya_names.get(bfl, bfl) if fmt == "kohya" else bfl
        if bfl not in table:
            unmatched.append(base)
            continue
        targets = table[bfl]
        if bfl == "final_layer.adaLN_modulation.1":
            up = torch.cat(up.chunk(2, dim=0)[::-1])  # BFL (shift, scale) -> diffusers (scale, shift)
        needed = max((s.stop for _, s in targets if s is not None), default=up.shape[0])
        if targets[0][1] is not None and up.shape[0] < needed:
            raise LoraError(f"{base}: up has {up.shape[0]} rows, the fused layer needs {needed}")
        for module, rows in targets:
            factors.append(LoraFactor(module, down, up if rows is None else up[rows], scale, base))
    if not factors:
        raise LoraError(
            f"no FLUX transformer LoRA keys recognized (format looked like {fmt}; e.g. {list(state)[:3]})"
        )
    _check_shapes(factors, modules)
    return ParsedLora(fmt, factors, unmatched, text_encoder)


def _in_out(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features if not isinstance(
        module, SplitInputLinear
    ) else module.parts[0].out_features


def _check_shapes(factors: list[LoraFactor], modules: dict[str, nn.Module]) -> None:
    for f in factors:
        k, n = _in_out(modules[f.module])
        if f.down.shape[1] != k or f.up.shape[0] != n:
            raise LoraError(
                f"{f.key}: shapes down {list(f.down.shape)} / up {list(f.up.shape)} do not fit {f.module} "
                f"({k} -> {n}); is this a FLUX LoRA for this model?"
            )


class LoraManager:
    """The set of LoRAs applied to one transformer; every change is all-or-nothing."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self._applied: list[tuple[str, ParsedLora, float]] = []
        self._merged: dict[str, torch.Tensor] = {}  # 16-bit module -> its original weight

    @property
    def active(self) -> list[tuple[str, float]]:
        return [(name, scale) for name, _, scale in self._applied]

    def set(self, loras: list[tuple[str, ParsedLora, float]]) -> None:
        """Replace the active LoRAs by ``[(name, parsed, scale)]`` (empty: the base model).

        If applying fails, the previous set is restored and the error raised.
        """
        if [(n, id(p), s) for n, p, s in loras] == [(n, id(p), s) for n, p, s in self._applied]:
            return
        previous = self._applied
        self._clear()
        try:
            for name, parsed, scale in loras:
                self._apply(name, parsed, scale)
        except Exception:
            self._clear()
            for name, parsed, scale in previous:
                self._apply(name, parsed, scale)
            self._applied = previous
            raise
        self._applied = list(loras)

    def clear(self) -> None:
        self.set([])

    def _clear(self) -> None:
        modules = dict(self.transformer.named_modules())
        for m in modules.values():
            if isinstance(m, SVDQLinear | W4A16Linear):
                m.clear_loras()
        for name, weight in self._merged.items():
            modules[name].weight = weight
        self._merged.clear()
        self._applied = []

    @torch.no_grad()
    def _apply(self, name: str, parsed: ParsedLora, scale: float) -> None:
        modules = dict(self.transformer.named_modules())
        for f in parsed.factors:
            m = modules[f.module]
            s = scale * f.scale
            if isinstance(m, SVDQLinear | W4A16Linear):
                m.add_lora(name, f.down, f.up, s)
            elif isinstance(m, SplitInputLinear):
                for part, down in zip(m.parts, f.down.split(m.sizes, dim=1), strict=True):
                    part.add_lora(name, down, f.up, s)
            else:  # a 16-bit nn.Linear: merge, keeping the original tensor to restore
                original = self._merged.setdefault(f.module, m.weight)
                w = m.weight
                merged = w.float() + s * (f.up.to(w.device) @ f.down.to(w.device))
                m.weight = nn.Parameter(merged.to(original.dtype), requires_grad=False)
        if parsed.unmatched:
            logger.warning(
                "LoRA %s: %d key(s) match no layer of this model and were not applied: %s",
                name,
                len(parsed.unmatched),
                ", ".join(parsed.unmatched[:8]),
            )
        if parsed.text_encoder:
            logger.warning(
                "LoRA %s: %d text-encoder key(s) are not applied (transformer LoRAs only): %s",
                name,
                len(parsed.text_encoder),
                ", ".join(parsed.text_encoder[:4]),
            )
        logger.info(
            "LoRA %s (%s format): %d layers, scale %g", name, parsed.format, len(parsed.factors), scale
        )


class LoraStore:
    """Where LoRA files come from: a local path, a URL, or a hub reference, cached on disk.

    Downloads land in ``root`` under the sha256 of their source string, verified like the
    model's weights (engine.weights), and the least recently used are evicted once the folder
    exceeds ``max_bytes``.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes

    def fetch(self, source: str) -> Path:
        source = source.strip()
        if Path(source).expanduser().is_file():
            return Path(source).expanduser()
        name = hashlib.sha256(source.encode()).hexdigest()[:32] + ".safetensors"
        cached = self.root / name
        if cached.exists():
            cached.touch()  # most recently used
            logger.info("LoRA cache hit: %s (%s)", source, cached.name)
            return cached
        if source.startswith(("http://", "https://")):
            entry = WeightFile(path=name, url=source, sha256=None)
        elif re.fullmatch(r"[\w.-]+/[\w.-]+(/.+\.safetensors)?", source):
            owner_repo = "/".join(source.split("/")[:2])
            file = "/".join(source.split("/")[2:]) or self._only_safetensors(owner_repo)
            entry = WeightFile(path=name, hub=owner_repo, file=file, sha256=None)
        else:
            raise LoraError(
                f"lora_weights: {source!r} is not an existing file, an http(s) URL, or a hub reference "
                "('owner/repo' or 'owner/repo/file.safetensors')"
            )
        try:
            ensure_files([entry], self.root)
        except WeightsError as e:
            raise LoraError(f"lora_weights: could not fetch {source}: {e}") from e
        self._evict(keep=cached)
        return cached

    @staticmethod
    def _only_safetensors(repo: str) -> str:
        from huggingface_hub import HfApi

        files = [f for f in HfApi().list_repo_files(repo) if f.endswith(".safetensors")]
        if len(files) != 1:
            raise LoraError(
                f"lora_weights: {repo} has {len(files)} .safetensors files ({files[:5]}); "
                "name one as owner/repo/file.safetensors"
            )
        return files[0]

    def _evict(self, keep: Path) -> None:
        files = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.max_bytes:
                break
            if p != keep:
                total -= p.stat().st_size
                p.unlink()
                p.with_name(p.name + ".sha256.json").unlink(missing_ok=True)
                logger.info("LoRA cache: evicted %s", p.name)
