"""FLUX LoRA file formats: read a state dict and map it onto the transformer's modules.

Read: diffusers/PEFT (``transformer.<module>.lora_A/lora_B``), kohya (``lora_unet_<bfl_name>
.lora_down/lora_up`` + ``.alpha``), ComfyUI (BFL module names, optionally under
``diffusion_model.``, with ``lora_A/lora_B`` or ``lora_down/lora_up`` + ``.alpha``) and XLabs
(``<block>.processor.{qkv,proj}_lora{1,2}.down/up``). Every file becomes a list of
``(diffusers module, down [r, K], up [N, r], alpha/rank)``; LoRAs trained on BFL's fused layers
are split the way diffusers splits the model: ``qkv`` rows into q, k, v (the down factor is
shared), the single block's ``linear1`` into q, k, v and ``proj_mlp``, and the single block's
``proj_out`` input columns into its attention and GELU parts.

On a model with fused blocks (engine.flux.blocks: ``attn.to_qkv``, ``attn.to_added_qkv``,
``to_qkv_mlp``) the factors of the siblings a fused layer replaces become one factor of the
fused layer: their down factors stacked (one down when they share it, as a LoRA trained on
BFL's fused ``qkv``/``linear1`` does) and a block-structured up factor, each sibling's up in
its own output rows and zero elsewhere. Exact: the fused layer's output rows are the
siblings' outputs.

Every factor is checked before anything is applied: a LoRA pair (rank > 0, matching ranks), one
scalar alpha, finite values (a LoRA holding NaN or Inf would turn every image into a constant),
and shapes that fit the target layer. Keys that match nothing and text-encoder keys are listed
in the result (engine.lora.manager logs them). Applying is engine.lora.manager's job; where
files come from is engine.lora.sources' and engine.lora.store's.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from engine.flux.blocks import sibling_rows
from engine.flux.layers import SplitInputLinear
from engine.modules import SVDQLinear, W4A16Linear

# A LoRA changes a weight by scale * up @ down. Bounded against the layer's own largest weight,
# with a wide margin (trained LoRAs change weights by a fraction of them; lora_scale adds at most
# 3x): finite but huge factors (1e30, alpha 3e38) pass a NaN/Inf check and give black images.
MAX_RELATIVE_CHANGE = 1e4
MAX_ALPHA_SCALE = 1e4  # alpha / rank
MAX_HEADER_BYTES = 16 * 2**20  # a safetensors header (JSON); real FLUX LoRAs: well under 1 MiB
MAX_KEYS = 20_000  # tensors in one LoRA file; FLUX LoRAs have about 1,000-3,000


class LoraError(ValueError):
    """A LoRA that cannot be fetched, read or applied; the model is left as it was."""


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
    """The tensors of a .safetensors file; a damaged file is a LoraError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    _check_header(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise LoraError(f"{path.name}: not a readable .safetensors LoRA file ({e})") from e


def _check_header(path: Path) -> None:
    """Bound the work before safetensors reads anything: header size and number of tensors."""
    import json
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraError(f"{path.name}: not a readable .safetensors LoRA file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > path.stat().st_size - 8:
            raise LoraError(f"{path.name}: not a readable .safetensors LoRA file (its header is cut short)")
        if n > MAX_HEADER_BYTES:
            raise LoraError(
                f"{path.name}: its safetensors header is {n:,} bytes, over the limit of {MAX_HEADER_BYTES:,}"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise LoraError(f"{path.name}: not a readable .safetensors LoRA file (header: {e})") from None
    keys = len(header) - ("__metadata__" in header) if isinstance(header, dict) else 0
    if keys > MAX_KEYS:
        raise LoraError(f"{path.name}: holds {keys:,} tensors, over the limit of {MAX_KEYS:,} for one LoRA")


def _alpha_scale(base: str, alpha: torch.Tensor, rank: int) -> float:
    if alpha.numel() != 1:
        raise LoraError(f"{base}.alpha: expected one number, got a tensor of shape {list(alpha.shape)}")
    value = float(alpha.reshape(()))
    if value != value or value in (float("inf"), float("-inf")):
        raise LoraError(f"{base}.alpha is {value}")
    if abs(value / rank) > MAX_ALPHA_SCALE:
        raise LoraError(
            f"{base}.alpha is {value:.3g}: alpha / rank = {value / rank:.3g}, beyond the accepted "
            f"+-{MAX_ALPHA_SCALE:g}"
        )
    return value / rank


@torch.no_grad()
def _layer_magnitude(m: nn.Module) -> float:
    """About the largest weight of a layer, in the units a LoRA's change is in."""
    if isinstance(m, SplitInputLinear):
        return max(_layer_magnitude(p) for p in m.parts)
    if isinstance(m, SVDQLinear):  # the 4-bit residual's largest value and the low-rank part's bound
        low = m.proj_up.double().norm(dim=1).max() * m.proj_down.double().norm(dim=0).max()
        return float(8 * m.wscales.double().abs().max() + low)
    if isinstance(m, W4A16Linear):
        return float(15 * m.wscales.double().abs().max() + m.wzeros.double().abs().max())
    return float(m.weight.detach().double().abs().max())


def _check_magnitude(f: LoraFactor, layer: nn.Module, name: str) -> None:
    """``|scale| * max row norm(up) * max column norm(down)`` bounds every entry of the change."""
    bound = abs(f.scale) * float(f.up.double().norm(dim=1).max() * f.down.double().norm(dim=0).max())
    own = max(_layer_magnitude(layer), 1e-6)
    if not bound <= MAX_RELATIVE_CHANGE * own:
        raise LoraError(
            f"{f.key}: its factors (with alpha) can change a weight of {name} by up to {bound:.3g}, "
            f"{bound / own:.3g} times the layer's largest weight ({own:.3g}); at most "
            f"{MAX_RELATIVE_CHANGE:g} times is accepted"
        )


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
    siblings = sibling_rows(model)
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
        if rank == 0:
            raise LoraError(f"{base}: rank 0 (empty down and up factors)")
        for role, t in (("down", down), ("up", up)):
            if not bool(torch.isfinite(t).all()):
                raise LoraError(f"{base}: its {role} factor holds NaN or Inf values")
        scale = _alpha_scale(base, parts["alpha"], rank) if "alpha" in parts else 1.0
        if fmt == "diffusers":
            name = re.sub(r"^(base_model\.model\.|transformer\.)+", "", base)
            if name in siblings or isinstance(
                modules.get(name), nn.Linear | SVDQLinear | W4A16Linear | SplitInputLinear
            ):
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
    _check_shapes(factors, modules, siblings)
    return ParsedLora(fmt, _onto_fused(factors, modules, siblings), unmatched, text_encoder)


def _onto_fused(
    factors: list[LoraFactor], modules: dict[str, nn.Module], siblings: dict[str, tuple[str, slice]]
) -> list[LoraFactor]:
    """Factors of fused siblings as one factor per fused layer (see the module doc), in order."""
    groups: dict[str, list[LoraFactor]] = {}
    out: list[LoraFactor | str] = []
    for f in factors:
        if f.module not in siblings:
            out.append(f)
            continue
        fused = siblings[f.module][0]
        if fused not in groups:
            groups[fused] = []
            out.append(fused)  # its place in the order
        groups[fused].append(f)
    merged = {}
    for fused, members in groups.items():
        downs: dict[int, torch.Tensor] = {}  # one column block per distinct down factor
        for f in members:
            downs.setdefault(id(f.down), f.down)
        offsets, start = {}, 0
        for key, down in downs.items():
            offsets[key] = start
            start += down.shape[0]
        one_scale = len({f.scale for f in members}) == 1
        up = torch.zeros(modules[fused].out_features, start)
        for f in members:
            rows, col = siblings[f.module][1], offsets[id(f.down)]
            up[rows, col : col + f.down.shape[0]] += f.up if one_scale else f.up * f.scale
        keys = list(dict.fromkeys(f.key for f in members))
        merged[fused] = LoraFactor(
            fused,
            torch.cat(list(downs.values())),
            up,
            members[0].scale if one_scale else 1.0,
            ", ".join(keys),
        )
    return [merged[f] if isinstance(f, str) else f for f in out]


def _check_shapes(
    factors: list[LoraFactor], modules: dict[str, nn.Module], siblings: dict[str, tuple[str, slice]]
) -> None:
    for f in factors:
        if f.module in siblings:  # a layer fused into a wider one: its input, its rows
            fused, rows = siblings[f.module]
            k, n = modules[fused].in_features, rows.stop - rows.start
        else:
            k, n = modules[f.module].in_features, modules[f.module].out_features
        if f.down.shape[1] != k or f.up.shape[0] != n:
            raise LoraError(
                f"{f.key}: shapes down {list(f.down.shape)} / up {list(f.up.shape)} do not fit {f.module} "
                f"({k} -> {n}); is this a FLUX LoRA for this model?"
            )
        fused = siblings[f.module][0] if f.module in siblings else f.module
        _check_magnitude(f, modules[fused], f.module)
