"""Test helpers: write a layer or a whole transformer in the public engine's INT4 layout, and
compute a layer's output the way its kernels define it (independently of our converter)."""

import json

import torch

from engine.flux import nunchaku_packing as nkp
from engine.quant import (
    GELU_SHIFT,
    dequantize_int4,
    dequantize_int4_asym,
    quantize_int4,
    quantize_int4_asym,
    quantize_svdq,
    smooth_factors,
    unpack_int4,
)


def their_w4a4(weight, bias, act_max, *, unsigned, rank=16, alpha=0.5, smooth=None):
    """Quantize a float layer with SVDQuant and store it as they do; ``smooth`` imposes a
    smoothing factor (alpha = 1 on it), as their joint smoothing of several layers does."""
    shift = GELU_SHIFT if unsigned else 0.0
    if smooth is not None:
        act_max, alpha = smooth - shift, 1.0
    q = quantize_svdq(weight, bias, act_max + shift, alpha=alpha, rank=rank, act_shift=shift)
    down_raw = (q.proj_down.float() / q.smooth_factor.float()).to(torch.bfloat16)  # they apply it to raw x
    b = q.bias.float()
    if unsigned:  # their shift touches only the 4-bit path
        b = b + GELU_SHIFT * (q.proj_up.float() @ down_raw.float().sum(dim=1))
    return {
        "qweight": nkp.pack_w4a4_weight(unpack_int4(q.qweight)),
        "wscales": nkp.pack_wscales(q.wscales),
        "smooth": nkp.pack_lane_vector(q.smooth_factor),
        "smooth_orig": nkp.pack_lane_vector(q.smooth_factor),
        "lora_down": nkp.pack_lowrank(down_raw, down=True),
        "lora_up": nkp.pack_lowrank(q.proj_up, down=False),
        "bias": nkp.pack_lane_vector(b.to(torch.bfloat16)),
    }


def their_w4a4_forward(t, x, *, unsigned):
    """y = Q((x + shift) / smooth) . Q(R)^T + (x @ down^T) @ up^T + bias, from their tensors."""
    x = x.float()
    smooth = nkp.unpack_lane_vector(t["smooth"]).float()
    x_hat = ((x + GELU_SHIFT) if unsigned else x) / smooth
    codes, scales = quantize_int4(x_hat, 64, unsigned=unsigned)
    w = dequantize_int4(nkp.unpack_w4a4_weight(t["qweight"]), nkp.unpack_wscales(t["wscales"]))
    down = nkp.unpack_lowrank(t["lora_down"], down=True).float()
    up = nkp.unpack_lowrank(t["lora_up"], down=False).float()
    bias = nkp.unpack_lane_vector(t["bias"]).float()
    return dequantize_int4(codes, scales) @ w.T + (x @ down.T) @ up.T + bias


def their_awq(weight, bias, chunks):
    """AdaLN linear as they store it: rows interleaved, +1 folded into the scale chunks' bias."""
    n = weight.shape[0]
    order = nkp.adanorm_order(n, chunks)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    b = bias.float().clone()
    b[nkp.adanorm_scale_rows(n, chunks)] += 1.0
    w_theirs = weight[inverse]
    codes, scales, zeros = quantize_int4_asym(w_theirs, 64, scale_dtype=torch.bfloat16)
    g = scales.shape[1]
    padded = -(-g // 16) * 16  # their packer pads the group count with zero rows

    def pad(t):
        return torch.cat([t.t(), t.new_zeros(padded - g, t.shape[0])])

    return {
        "qweight": nkp.pack_awq_weight(codes),
        "wscales": pad(scales),
        "wzeros": pad(zeros),
        "bias": b[inverse].to(torch.bfloat16),
    }


def their_awq_forward(t, x):
    g = t["qweight"].shape[1] * 2 // 64
    w = dequantize_int4_asym(nkp.unpack_awq_weight(t["qweight"]), t["wscales"][:g].t(), t["wzeros"][:g].t())
    return x.float() @ w.T + t["bias"].float()


def their_checkpoint(model, stats, rank=16):
    """A whole transformer in their v1 key layout, quantized from ``model`` with ``stats``."""
    sd = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            sd[name] = tensor.to(torch.bfloat16)
    for i, block in enumerate(model.transformer_blocks):
        p = f"transformer_blocks.{i}"
        a = block.attn
        fused = {
            "qkv_proj": ([a.to_q, a.to_k, a.to_v], f"{p}.attn.to_q", False),
            "qkv_proj_context": ([a.add_q_proj, a.add_k_proj, a.add_v_proj], f"{p}.attn.add_q_proj", False),
            "out_proj": ([a.to_out[0]], f"{p}.attn.to_out.0", False),
            "out_proj_context": ([a.to_add_out], f"{p}.attn.to_add_out", False),
            "mlp_fc1": ([block.ff.net[0].proj], f"{p}.ff.net.0.proj", False),
            "mlp_fc2": ([block.ff.net[2]], f"{p}.ff.net.2", True),
            "mlp_context_fc1": ([block.ff_context.net[0].proj], f"{p}.ff_context.net.0.proj", False),
            "mlp_context_fc2": ([block.ff_context.net[2]], f"{p}.ff_context.net.2", True),
        }
        for their_name, (linears, stat_name, unsigned) in fused.items():
            w = torch.cat([lin.weight for lin in linears]).float()
            b = torch.cat([lin.bias for lin in linears]).float()
            for k, v in their_w4a4(w, b, stats[stat_name].act_max, unsigned=unsigned, rank=rank).items():
                sd[f"{p}.{their_name}.{k}"] = v
        for norm, chunks in (("norm1", 6), ("norm1_context", 6)):
            lin = getattr(block, norm).linear
            for k, v in their_awq(lin.weight.float(), lin.bias.float(), chunks).items():
                sd[f"{p}.{norm}.linear.{k}"] = v
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            sd[f"{p}.{n}.weight"] = getattr(a, n).weight.to(torch.bfloat16)
    for i, block in enumerate(model.single_transformer_blocks):
        p = f"single_transformer_blocks.{i}"
        a = block.attn
        inner = block.proj_out.in_features - block.mlp_hidden_dim
        act = stats[f"{p}.proj_out"].act_max
        w_out = block.proj_out.weight.float()
        w_qkv = torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]).float()
        # deepcompressor smooths q/k/v and proj_mlp jointly (one factor for the shared input);
        # each keeps its own low-rank branch.
        shared = smooth_factors(stats[f"{p}.attn.to_q"].act_max, torch.cat([w_qkv, block.proj_mlp.weight.float()]), 0.5)
        parts = {
            "qkv_proj": (w_qkv, torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]).float(), None, False, shared),
            "mlp_fc1": (block.proj_mlp.weight.float(), block.proj_mlp.bias.float(), None, False, shared),
            "out_proj": (w_out[:, :inner], block.proj_out.bias.float(), act[:inner], False, None),
            "mlp_fc2": (w_out[:, inner:], torch.zeros(w_out.shape[0]), act[inner:], True, None),
        }
        for their_name, (w, b, amax, unsigned, smooth) in parts.items():
            for k, v in their_w4a4(w, b, amax, unsigned=unsigned, rank=rank, smooth=smooth).items():
                sd[f"{p}.{their_name}.{k}"] = v
        for k, v in their_awq(block.norm.linear.weight.float(), block.norm.linear.bias.float(), 3).items():
            sd[f"{p}.norm.linear.{k}"] = v
        for n in ("norm_q", "norm_k"):
            sd[f"{p}.{n}.weight"] = getattr(a, n).weight.to(torch.bfloat16)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    metadata = {
        "config": json.dumps(config),
        "quantization_config": json.dumps(
            {"method": "svdquant", "weight": {"dtype": "int4"}, "activation": {"dtype": "int4"}, "rank": rank}
        ),
    }
    return {k: v.contiguous() for k, v in sd.items()}, metadata
