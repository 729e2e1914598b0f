"""Read the public engine's (nunchaku's) INT4 FLUX checkpoints into our plain format.

Their layout, worked out from their source and documented in docs/checkpoint-format.md:

* W4A4 layers: ``qweight`` int8 [N, K/2] in an MMA-fragment tile order, ``wscales`` [K/64, N] in
  a lane order, ``bias`` [N] and ``smooth``/``smooth_factor`` [K] in that same lane order (their
  packer writes them as one-group scales; the input is divided by ``smooth``, as in ours),
  ``lora_down``/``proj_down`` [K, R] and ``lora_up``/``proj_up`` [N, R] in 16x16 packs. Their
  low-rank branch reads the *raw* input (ours reads the smoothed one), so our down factor is
  theirs times the smoothing factor. On unsigned layers they add the GELU shift to the 4-bit
  path only; ours shifts both paths, so the bias moves by ``shift * up @ down.sum(1)``.
* q, k and v are one fused layer (``qkv_proj``, ``qkv_proj_context``), as ours are
  (``attn.to_qkv``, ``attn.to_added_qkv``: checkpoint format version 2): mapped directly.
* In the single blocks their ``qkv_proj`` and ``mlp_fc1`` are two layers, but deepcompressor
  smooths them jointly (``smooth_diffusion_parallel_qkv_up_proj``: one smoothing factor for
  q/k/v and the MLP input), so they are our one ``to_qkv_mlp``, exactly: the same smoothed
  input gives the same activation codes; each keeps its own low-rank branch, as the down
  factors concatenated ([2R, K]) with a block-diagonal up factor ([N, 2R]). A file whose two
  smoothing factors differ is refused (it could not be one layer exactly).
* The single block's ``proj_out`` is ``out_proj`` (attention slice) + ``mlp_fc2`` (GELU slice,
  unsigned), our SplitInputLinear's ``parts.0`` and ``parts.1``.
* AdaLN linears are AWQ W4A16: ``qweight`` int32 [N/4, K/2] in TinyChat's order,
  ``wscales``/``wzeros`` [G', N] with ``w = q * s + z``, where the group count is padded (zero
  rows) to a multiple of 16 (TinyChat's packer); the output channels are interleaved
  (``d * chunks + c``) and the ``1 +`` of ``(1 + scale)`` is folded into the scale chunks' bias.

Every unpacker has its packer beside it in engine.flux.nunchaku_packing (the exact inverse,
checked by the tests), so a file in their layout can be made from ours as well.
"""

from __future__ import annotations

import dataclasses
import json
import re

import torch

from engine.flux.nunchaku_packing import (
    adanorm_order,
    adanorm_scale_rows,
    unpack_awq_weight,
    unpack_lane_vector,
    unpack_lowrank,
    unpack_w4a4_weight,
    unpack_wscales,
)
from engine.quant import GELU_SHIFT, pack_int4

# --- whole checkpoints --------------------------------------------------------------------------

_DOUBLE_W4A4 = {  # their name -> ours (checkpoint format version 2)
    "qkv_proj": "attn.to_qkv",
    "qkv_proj_context": "attn.to_added_qkv",
    "out_proj": "attn.to_out.0",
    "out_proj_context": "attn.to_add_out",
    "mlp_fc1": "ff.net.0.proj",
    "mlp_fc2": "ff.net.2",
    "mlp_context_fc1": "ff_context.net.0.proj",
    "mlp_context_fc2": "ff_context.net.2",
}
_SINGLE_W4A4 = {  # qkv_proj and mlp_fc1: one layer, outputs in this order
    "qkv_proj": "to_qkv_mlp",
    "mlp_fc1": "to_qkv_mlp",
    "out_proj": "proj_out.parts.0",
    "mlp_fc2": "proj_out.parts.1",
}
_UNSIGNED = {"mlp_fc2", "mlp_context_fc2"}
_ADANORM = {"norm1.linear": 6, "norm1_context.linear": 6, "norm.linear": 3}
_RENAMES = {
    "norm_q": "attn.norm_q",
    "norm_k": "attn.norm_k",
    "norm_added_q": "attn.norm_added_q",
    "norm_added_k": "attn.norm_added_k",
}
_W4A4_TENSORS = {
    "qweight",
    "wscales",
    "smooth",
    "smooth_factor",
    "smooth_orig",
    "smooth_factor_orig",
    "lora_down",
    "proj_down",
    "lora_up",
    "proj_up",
    "bias",
}


def is_nunchaku(metadata: dict[str, str], keys: set[str]) -> bool:
    return "config" in metadata or any(".qkv_proj.qweight" in k for k in keys)


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _lane(t: dict[str, torch.Tensor], *names: str) -> torch.Tensor | None:
    """The first of ``names`` present in ``t`` (their v1 and v2 key names), or None."""
    return next((t[n] for n in names if n in t), None)


def check_w4a4_layer(name: str, t: dict[str, torch.Tensor]) -> tuple[int, int, int | None]:
    """(N, K, rank or None) of one of their W4A4 layers, every tensor's dtype and shape checked.

    Their INT4 layout has 16-bit scales, one per 64 inputs; an fp8 scale at these shapes is
    NVFP4's (or a damaged file) and would load as numbers of another meaning, so it is refused.
    """
    for key in ("qweight", "wscales"):
        if key not in t:
            raise ValueError(f"{name}: no {key} (a W4A4 layer has qweight, wscales, smooth, lora_down, lora_up)")
    if _lane(t, "smooth_factor", "smooth") is None:
        raise ValueError(f"{name}: no smooth (smooth_factor)")
    q, ws = t["qweight"], t["wscales"]
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"{name}.qweight: {q.dtype} {list(q.shape)}: expected int8 [N, K/2]")
    n, k = q.shape[0], 2 * q.shape[1]
    if ws.dtype not in _FLOATS[:2]:
        raise ValueError(
            f"{name}.wscales: {ws.dtype}: an INT4 file has bfloat16 or float16 scales"
            + (" (fp8 scales are NVFP4's, which this engine does not serve)" if ws.element_size() == 1 else "")
        )
    if tuple(ws.shape) != (k // 64, n):
        raise ValueError(f"{name}.wscales: {list(ws.shape)}: expected [K/64, N] = [{k // 64}, {n}] (group size 64)")
    vectors = {"smooth": k, "smooth_factor": k, "smooth_orig": k, "smooth_factor_orig": k, "bias": n}
    for key, size in vectors.items():
        if key in t and (t[key].dtype not in _FLOATS or tuple(t[key].shape) != (size,)):
            raise ValueError(f"{name}.{key}: {t[key].dtype} {list(t[key].shape)}: expected a float vector [{size}]")
    down, up = _lane(t, "proj_down", "lora_down"), _lane(t, "proj_up", "lora_up")
    if (down is None) != (up is None):
        raise ValueError(f"{name}: has only one of lora_down and lora_up (the low-rank branch needs both)")
    if down is None:
        return n, k, None
    for key, f, rows in (("lora_down", down, k), ("lora_up", up, n)):
        if f.dtype not in _FLOATS or f.dim() != 2 or f.shape[0] != rows or f.shape[1] != down.shape[1]:
            raise ValueError(
                f"{name}.{key}: {f.dtype} {list(f.shape)}: expected a float [{rows}, rank]"
                f" with the rank of lora_down ({down.shape[1]})"
            )
    return n, k, down.shape[1]


def _w4a4_layer(t: dict[str, torch.Tensor], unsigned: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One of their W4A4 layers in our plain format (before any row split or un-fusing).

    ``smooth`` divides the input the layer receives. On an out projection of a smooth-fused file
    that is all ones, and ``smooth_orig`` is the factor that was divided into the value rows
    (:func:`unfuse_out_smoothing` puts it back). A layer without a low-rank branch (lora_down
    and lora_up both absent; :func:`pad_lowrank` gave it zero factors) is exact with them.
    """
    smooth = unpack_lane_vector(_lane(t, "smooth_factor", "smooth"))
    down_raw = unpack_lowrank(_lane(t, "proj_down", "lora_down"), down=True).float()  # [R, K]
    up = unpack_lowrank(_lane(t, "proj_up", "lora_up"), down=False)  # [N, R]
    bias = unpack_lane_vector(t["bias"]).float() if "bias" in t else torch.zeros(up.shape[0])
    if unsigned:
        bias = bias - GELU_SHIFT * (up.float() @ down_raw.sum(dim=1))
    return {
        "qweight": pack_int4(unpack_w4a4_weight(t["qweight"])),
        "wscales": unpack_wscales(t["wscales"]).to(dtype),
        "smooth_factor": smooth.to(dtype),
        "proj_down": (down_raw * smooth.float()).to(dtype),
        "proj_up": up.to(dtype),
        "bias": bias.to(dtype),
    }


def pad_lowrank(t: dict[str, torch.Tensor], rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``t`` with zero low-rank factors of ``rank`` where it has none: a zero branch adds
    nothing, so the layer computes what it did (deepcompressor writes no lora_down/lora_up for a
    layer quantized without the branch)."""
    n, k = t["qweight"].shape[0], 2 * t["qweight"].shape[1]
    return {**t, "lora_down": torch.zeros(k, rank, dtype=dtype), "lora_up": torch.zeros(n, rank, dtype=dtype)}


# Their out projections and the fused q/k/v layers whose value rows a fused smoothing divides.
_OUT_PROJ = {"out_proj": "qkv_proj", "out_proj_context": "qkv_proj_context"}


def unfuse_out_smoothing(
    block: str, theirs: dict[str, dict[str, torch.Tensor]], plain: dict[str, dict[str, torch.Tensor]]
) -> bool:
    """Undo deepcompressor's ``fuse_when_possible`` on one block, in place; True if it was fused.

    deepcompressor (app/diffusion/quant/smooth.py, ``smooth_diffusion_out_proj``) divides the
    value projections' rows (and bias) by the out projections' smoothing factor s, so the
    attention output arrives already divided by s; its packer (backend/nunchaku/convert.py,
    ``smooth_fused``) then writes the out projections with ``smooth`` = ones, ``smooth_orig``
    = s, and their low-rank down factor not divided by s. The base model is the same either
    way, but a LoRA is given in the original weight space: on a fused file its v-row delta
    would be s times too large and its out-projection input s times too small. So we multiply
    the v rows' scales, up factors and bias by s (bf16 rounding of the products, nothing else)
    and give the out projections s as their smoothing factor (their down factor already reads
    x / s). Joint attention mixes both streams' values, so both streams' s must be one vector.
    """
    outs = [o for o in _OUT_PROJ if o in plain]
    origs = {o: _lane(theirs[o], "smooth_factor_orig", "smooth_orig") for o in outs}
    fused = {
        o: origs[o] is not None
        and bool((plain[o]["smooth_factor"] == 1).all())
        and not bool((origs[o] == 1).all())
        for o in outs
    }
    if not any(fused.values()):
        return False
    if not all(fused.values()):
        raise ValueError(f"{block}: the smoothing of only some out projections is fused: {fused}")
    s = unpack_lane_vector(origs[outs[0]])
    if any(not torch.equal(unpack_lane_vector(origs[o]), s) for o in outs[1:]):
        raise ValueError(
            f"{block}: out_proj and out_proj_context have different fused smoothing factors; joint "
            "attention mixes both streams' values, so such a file has no consistent meaning"
        )
    inner = s.numel()
    for o in outs:
        qkv = _OUT_PROJ[o]
        if qkv not in plain or plain[qkv]["wscales"].shape[0] != 3 * inner:
            raise ValueError(f"{block}.{o}: its smoothing is fused, but {qkv} has no value rows [{inner}]")
        layer, rows = plain[qkv], slice(2 * inner, 3 * inner)
        for key in ("wscales", "proj_up"):
            layer[key][rows] = (layer[key][rows].float() * s.float().unsqueeze(1)).to(layer[key].dtype)
        layer["bias"][rows] = (layer["bias"][rows].float() * s.float()).to(layer["bias"].dtype)
        plain[o]["smooth_factor"] = s.to(plain[o]["smooth_factor"].dtype)
    return True


def check_awq_layer(name: str, t: dict[str, torch.Tensor]) -> None:
    """Dtypes of one of their AWQ W4A16 layers: int32 codes, 16-bit scales, zeros and bias."""
    for key in ("qweight", "wscales", "wzeros", "bias"):
        if key not in t:
            raise ValueError(f"{name}: no {key} (an AWQ W4A16 layer has qweight, wscales, wzeros, bias)")
    if t["qweight"].dtype != torch.int32 or t["qweight"].dim() != 2:
        raise ValueError(f"{name}.qweight: {t['qweight'].dtype} {list(t['qweight'].shape)}: expected int32 [N/4, K/2]")
    for key in ("wscales", "wzeros", "bias"):
        if t[key].dtype not in _FLOATS:
            raise ValueError(f"{name}.{key}: {t[key].dtype}: expected bfloat16 or float16")


def _awq_layer(t: dict[str, torch.Tensor], chunks: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    codes = unpack_awq_weight(t["qweight"])  # [N, K], their row order
    n, k = codes.shape
    g = k // 64
    if t["wscales"].shape[0] < g or bool((t["wscales"][g:] != 0).any()):
        raise ValueError(f"AWQ wscales {list(t['wscales'].shape)}: expected {g} groups (+ zero padding)")
    order = adanorm_order(n, chunks)
    bias = t["bias"].float()[order]
    bias[adanorm_scale_rows(n, chunks)] -= 1.0
    return {
        "qweight": pack_int4(codes[order]),
        "wscales": t["wscales"][:g].t()[order].to(dtype),  # drop the packer's padding groups
        "wzeros": t["wzeros"][:g].t()[order].to(dtype),
        "bias": bias.to(dtype),
    }


def concat_outputs(layers: list[dict[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """W4A4 layers (our plain format) that read one input, as one layer with their outputs
    concatenated in order. Exact only if they share the smoothing factor (then the smoothed
    input and its 4-bit codes are the same for all); their low-rank branches stay apart: one
    down factor if they share it, else the downs stacked under a block-diagonal up factor."""
    smooth = layers[0]["smooth_factor"]
    if any(not torch.equal(layer["smooth_factor"], smooth) for layer in layers[1:]):
        raise ValueError(f"{what}: its parts have different smoothing factors, so they cannot be one layer exactly")
    downs, ups = [layer["proj_down"] for layer in layers], [layer["proj_up"] for layer in layers]
    if all(torch.equal(d, downs[0]) for d in downs[1:]):
        down, up = downs[0], torch.cat(ups)
    else:
        down, up = torch.cat(downs), torch.block_diag(*ups)
    return {
        "qweight": torch.cat([layer["qweight"] for layer in layers]),
        "wscales": torch.cat([layer["wscales"] for layer in layers]),
        "smooth_factor": smooth,
        "proj_down": down,
        "proj_up": up,
        "bias": torch.cat([layer["bias"] for layer in layers]),
    }


@dataclasses.dataclass(frozen=True)
class Converted:
    """Their checkpoint in our layout: the tensors and what our metadata needs to describe them,
    and what the file held (for the log: the first real load shows what the published file is)."""

    state: dict[str, torch.Tensor]
    rank: int
    transformer_config: dict
    unsigned_layers: list[str]
    dtype: torch.dtype = torch.bfloat16
    attention_blocks: int = 0  # blocks with an out projection
    smooth_fused_blocks: list[str] = dataclasses.field(default_factory=list)  # un-fused at load
    padded_layers: list[str] = dataclasses.field(default_factory=list)  # had no low-rank branch

    def describe(self) -> str:
        fused, blocks = len(self.smooth_fused_blocks), self.attention_blocks
        kind = (
            "smoothing NOT fused (out projections carry their own smoothing factor)"
            if not fused
            else f"out-projection smoothing fused into v in {fused} of {blocks} blocks (deepcompressor "
            "fuse_when_possible): un-fused at load, so LoRAs on v and the out projections are exact"
        )
        pad = f"; {len(self.padded_layers)} layers without a low-rank branch padded with zeros" if self.padded_layers else ""
        return f"INT4 W4A4, rank {self.rank}, group size 64, {str(self.dtype).removeprefix('torch.')}; {kind}{pad}"


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """Their block tensors grouped as {block: {layer: {tensor: value}}}; the rest as ours."""
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        m = re.fullmatch(r"((?:single_)?transformer_blocks\.\d+)\.(.+)\.([a-z_]+)", key)
        if not m:
            out[key] = value
            continue
        block, layer, tensor = m.groups()
        known = layer in (_SINGLE_W4A4 if block.startswith("single") else _DOUBLE_W4A4) or layer in _ADANORM
        if known and tensor in _W4A4_TENSORS | {"wzeros"}:
            layers.setdefault(block, {}).setdefault(layer, {})[tensor] = value
        elif layer in _RENAMES and tensor == "weight":
            out[f"{block}.{_RENAMES[layer]}.weight"] = value
        elif layer.startswith(("attn.", "ff.", "ff_context.", "proj_", "norm")):
            out[key] = value  # already in diffusers' names (their v2 layout)
        else:
            unknown.append(key)
    return layers, out, unknown


def convert_state_dict(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Converted:
    """Their tensors -> ours; unknown block tensors, wrong dtypes or shapes are an error (a
    ValueError naming the tensor). Layout only: the checkpoint module (engine.flux.checkpoint)
    turns the result into our format's metadata."""
    quant = json.loads(metadata.get("quantization_config", "{}"))
    if str(quant.get("weight", {}).get("dtype", "int4")).lower() not in ("int4", "sint4", "s4"):
        raise ValueError(f"unsupported precision in the public checkpoint: {quant.get('weight')}")
    if any(k.endswith(".wcscales") for k in state):
        raise ValueError("NVFP4 checkpoints of the public engine are not supported; use its INT4 checkpoint")
    layers, out, unknown = _split(state)
    if unknown:
        raise ValueError(
            f"tensors of the public checkpoint with no place in ours: {unknown[:5]} ({len(unknown)})"
        )
    dtypes = {v.dtype for v in state.values() if v.dtype in (torch.bfloat16, torch.float16)}
    if len(dtypes) != 1:
        raise ValueError(f"expected one 16-bit dtype (bfloat16 or float16) for the scales and weights, found {dtypes or 'none'}")
    dtype = dtypes.pop()
    ranks, shapes = set(), {}
    for block, block_layers in layers.items():
        for layer, tensors in block_layers.items():
            if layer in _ADANORM:
                check_awq_layer(f"{block}.{layer}", tensors)
            else:
                shapes[block, layer] = check_w4a4_layer(f"{block}.{layer}", tensors)
                ranks.add(shapes[block, layer][2])
    padded = sorted(f"{b}.{n}" for (b, n), (_, _, r) in shapes.items() if r is None)
    ranks.discard(None)
    if len(ranks) > 1:
        raise ValueError(f"the public checkpoint's layers disagree on the rank: {sorted(ranks)}")
    rank = next(iter(ranks)) if ranks else int(quant.get("rank", 32))
    unsigned_layers, fused_blocks = [], []
    for block, block_layers in layers.items():
        table = _SINGLE_W4A4 if block.startswith("single") else _DOUBLE_W4A4
        plain: dict[str, dict[str, torch.Tensor]] = {}
        for layer, tensors in block_layers.items():
            if layer in _ADANORM:
                for name, v in _awq_layer(tensors, _ADANORM[layer], dtype).items():
                    out[f"{block}.{layer}.{name}"] = v
                continue
            if f"{block}.{layer}" in padded:
                tensors = pad_lowrank(tensors, rank, dtype)
            plain[layer] = _w4a4_layer(tensors, layer in _UNSIGNED, dtype)
            if layer in _UNSIGNED:
                unsigned_layers.append(f"{block}.{table[layer]}")
        if unfuse_out_smoothing(block, block_layers, plain):
            fused_blocks.append(block)
        targets: dict[str, list[dict[str, torch.Tensor]]] = {}
        for layer in sorted(plain, key=list(table).index):
            targets.setdefault(table[layer], []).append(plain[layer])
        for target, converted in targets.items():
            ours = converted[0] if len(converted) == 1 else concat_outputs(converted, f"{block}.{target}")
            for name, v in ours.items():
                out[f"{block}.{target}.{name}"] = v
    return Converted(
        state=out,
        rank=rank,
        transformer_config=json.loads(metadata["config"]),
        unsigned_layers=sorted(unsigned_layers),
        dtype=dtype,
        attention_blocks=sum(1 for block_layers in layers.values() if "out_proj" in block_layers),
        smooth_fused_blocks=sorted(fused_blocks),
        padded_layers=padded,
    )
