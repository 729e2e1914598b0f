"""The public INT4 checkpoint, tested against its producer: MIT HAN Lab's deepcompressor.

The published ``svdq-int4_r32-flux.1-schnell`` file was written by deepcompressor's nunchaku
backend (PyPI ``deepcompressor-toolkit``, ``backend/nunchaku/``). Here its own packer writes the
files, from quantities that we choose ("the deepcompressor side": residual weight, group scales,
smoothing factor, low-rank branch, bias, GELU shift), and our converter must hand back exactly
those quantities, and our layers must compute what they define. Nothing in this file packs a
tensor by our own reading of their layout.
"""

import copy
import json
import re

import pytest
import torch
from deepcompressor.backend.nunchaku.convert import (
    convert_to_nunchaku_flux_state_dicts,
    convert_to_nunchaku_w4x4y16_linear_state_dict,
    convert_to_nunchaku_w4x16_adanorm_single_state_dict,
    convert_to_nunchaku_w4x16_adanorm_zero_state_dict,
)
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from engine.flux import calibrate, load_transformer
from engine.flux import nunchaku as nk
from engine.flux.blocks import DOUBLE_FUSED, SINGLE_FUSED
from engine.modules import SVDQLinear, W4A16Linear
from engine.quant import GELU_SHIFT, quantize_svdq, relative_error, unpack_int4

from .flux_cases import first_step_inputs, params_to_float, velocity

BF16 = torch.bfloat16


# --- the deepcompressor side, and what it means -------------------------------------------------


def exact_scales(shape, gen) -> torch.Tensor:
    """bf16 scales with 3-bit mantissas: ``code * scale`` is exact in bf16, so ``round(w / s)``
    in their packer returns our codes whatever rounding the product went through."""
    mant = 1 + torch.randint(0, 8, shape, generator=gen) / 8
    return (mant * 2.0 ** torch.randint(-8, -4, shape, generator=gen)).to(BF16)


def act_quant(x: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """Dynamic per-token, per-64-group 4-bit activation quantization, dequantized (DESIGN.md 4)."""
    g = x.unflatten(-1, (-1, 64))
    s = (g.amax(-1).clamp_min(0) / 15) if unsigned else (g.abs().amax(-1) / 7)
    s = s.unsqueeze(-1)
    q = torch.where(s > 0, torch.round(g / torch.where(s > 0, s, 1)), 0)
    q = q.clamp(0, 15) if unsigned else q.clamp(-8, 7)
    return (q * s).flatten(-2)


def dc_w4a4_forward(x, weight, scale, bias, smooth, a, b, shift):
    """A W4A4 layer as the deepcompressor side defines it: the input (plus the GELU shift) is
    divided by the smoothing factor, quantized, multiplied by the residual; the low-rank branch
    reads the same smoothed input; then the bias."""
    x_hat = (x.float() + shift) / smooth.float()
    return (
        act_quant(x_hat, unsigned=bool(shift)) @ weight.float().T + (x_hat @ a.float().T) @ b.float().T + bias
    )


def random_w4a4(n, k, r, gen, *, unsigned):
    g = k // 64
    codes = torch.randint(-8, 8, (n, k), generator=gen)
    scale = exact_scales((n, g), gen)
    weight = (codes.unflatten(1, (g, 64)) * scale.float().unsqueeze(-1)).flatten(1).to(BF16)
    assert torch.equal(weight.float(), (codes.unflatten(1, (g, 64)) * scale.float().unsqueeze(-1)).flatten(1))
    return {
        "codes": codes,
        "weight": weight,
        "scale": scale,
        "bias": (torch.randn(n, generator=gen) / 4).to(BF16),
        "smooth": (torch.rand(k, generator=gen) * 4 + 0.25).to(BF16),
        "a": (torch.randn(r, k, generator=gen) / k**0.5).to(BF16),
        "b": (torch.randn(n, r, generator=gen) / r**0.5).to(BF16),
        "shift": GELU_SHIFT if unsigned else 0.0,
    }


# --- one layer at a time ------------------------------------------------------------------------


@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_w4a4_layer_written_by_deepcompressor_converts_exactly(unsigned):
    gen = torch.Generator().manual_seed(1)
    n, k, r = 384, 256, 32
    q = random_w4a4(n, k, r, gen, unsigned=unsigned)
    theirs = convert_to_nunchaku_w4x4y16_linear_state_dict(
        weight=q["weight"],
        scale=q["scale"].view(n, 1, k // 64, 1),
        bias=q["bias"],
        smooth=q["smooth"],
        lora=(q["a"], q["b"]),
        shift=torch.tensor([q["shift"]]) if unsigned else None,
    )
    # Every tensor they write is one we read.
    assert set(theirs) <= nk._W4A4_TENSORS, set(theirs) - nk._W4A4_TENSORS
    ours = nk._w4a4_layer(theirs, unsigned, BF16)
    assert {name: (tuple(t.shape), t.dtype) for name, t in ours.items()} == {
        "qweight": ((n, k // 2), torch.uint8),
        "wscales": ((n, k // 64), BF16),
        "smooth_factor": ((k,), BF16),
        "proj_down": ((r, k), BF16),
        "proj_up": ((n, r), BF16),
        "bias": ((n,), BF16),
    }
    assert torch.equal(unpack_int4(ours["qweight"]).long(), q["codes"])
    assert torch.equal(ours["wscales"], q["scale"])
    assert torch.equal(ours["smooth_factor"], q["smooth"])
    assert torch.equal(ours["proj_up"], q["b"])
    # They store a / smooth in bf16 (their branch reads the raw input); we multiply back: two
    # bf16 roundings at most.
    assert torch.allclose(ours["proj_down"].float(), q["a"].float(), rtol=2**-7, atol=0)
    # Unsigned: they add shift * up @ (a / smooth) (in fp64) to the bias and round it to bf16; we
    # take it out again with the stored bf16 factors. Bound: those roundings, nothing more.
    term = q["shift"] * (q["b"].float() @ (q["a"].float() / q["smooth"].float()).sum(1))
    term_abs = q["shift"] * (q["b"].float().abs() @ (q["a"].float().abs() / q["smooth"].float()).sum(1))
    bias = q["bias"].float()
    bias_tol = 2**-8 * ((bias + term).abs() + bias.abs() + term_abs) + 1e-7
    assert ((ours["bias"].float() - q["bias"].float()).abs() <= bias_tol).all()

    layer = SVDQLinear(k, n, rank=r, unsigned=unsigned, act_shift=q["shift"])
    layer.load_state_dict(ours)
    x = torch.randn(2, 37, k, generator=gen)
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    ref = dc_w4a4_forward(
        x, q["weight"], q["scale"], q["bias"].float(), q["smooth"], q["a"], q["b"], q["shift"]
    )
    # Same codes and scales; what differs is the bf16 rounding of a / smooth (and the bias).
    assert relative_error(layer(x), ref) < 5e-3


@pytest.mark.parametrize(
    ("convert", "chunks"),
    [
        (convert_to_nunchaku_w4x16_adanorm_zero_state_dict, 6),
        (convert_to_nunchaku_w4x16_adanorm_single_state_dict, 3),
    ],
    ids=["adanorm_zero", "adanorm_single"],
)
@pytest.mark.parametrize("k", [256, 3072])  # 4 groups: their packer pads to 16; 48: no padding
def test_w4a16_adanorm_layer_written_by_deepcompressor_converts_exactly(convert, chunks, k):
    gen = torch.Generator().manual_seed(2)
    n, g = 64 * chunks, k // 64
    codes = torch.randint(0, 16, (n, k), generator=gen)  # their zero point is 7
    scale = exact_scales((n, g), gen)
    weight = ((codes - 7).unflatten(1, (g, 64)) * scale.float().unsqueeze(-1)).flatten(1).to(BF16)
    bias = (torch.randn(n, generator=gen) / 4).to(BF16)
    theirs = convert(weight=weight, scale=scale.view(n, 1, g, 1), bias=bias.clone())
    assert theirs["wscales"].shape[0] == -(-g // 16) * 16
    ours = nk._awq_layer(theirs, chunks, BF16)
    assert {name: tuple(t.shape) for name, t in ours.items()} == {
        "qweight": (n, k // 2),
        "wscales": (n, g),
        "wzeros": (n, g),
        "bias": (n,),
    }
    assert torch.equal(unpack_int4(ours["qweight"], signed=False).long(), codes)
    assert torch.equal(ours["wscales"], scale)
    assert torch.equal(ours["wzeros"].float(), -7 * scale.float())  # exact for these scales
    # Their +1 on the scale chunks' bias went through bf16 and back.
    assert torch.allclose(ours["bias"].float(), bias.float(), atol=2**-7, rtol=0)
    layer = W4A16Linear(k, n)
    layer.load_state_dict(ours)
    x = torch.randn(3, k, generator=gen)
    assert relative_error(layer(x), x @ weight.float().T + ours["bias"].float()) < 1e-5


# --- a whole tiny FLUX transformer --------------------------------------------------------------


def _quantize(w, b, act_max, *, rank, shift=0.0, smooth=None):
    """Our quantizer; with ``smooth`` given, that smoothing factor (alpha = 1 on it)."""
    if smooth is not None:
        return quantize_svdq(w, b, smooth.float(), alpha=1.0, rank=rank, act_shift=shift)
    return quantize_svdq(w, b, act_max, alpha=0.5, rank=rank, act_shift=shift)


def deepcompressor_side(model: FluxTransformer2DModel, stats, rank: int, *, fuse: bool = True):
    """The four dicts deepcompressor's converter takes, for ``model`` quantized with SVDQuant,
    and for each of our W4A4 layer names where its quantities sit in them.

    With ``fuse`` (deepcompressor's ``smooth.proj.fuse_when_possible``, its default) the out
    projections' smoothing is fused into the value projections (the attention output arrives
    already divided by it; ``where`` gives that factor as ``unfuse`` for the value rows); without,
    the smoothing dict says ``proj.fuse_when_possible: False``, as deepcompressor's own cache
    does. Either way one smoothing factor is shared between q/k/v (and, in the single blocks,
    proj_mlp), and one low-rank branch per fused q/k/v.
    """
    sd = {k: v.to(BF16) for k, v in model.state_dict().items()}
    scales, smooths, branches, where = {}, {}, {}, {}
    if not fuse:
        smooths["proj.fuse_when_possible"] = False

    def put(pairs, q, *, key, smooth_key=None, shift=None):
        """Store ``q`` (rows split over ``pairs`` of (our name, their module name))."""
        codes = unpack_int4(q.qweight).float()
        residual = (codes.unflatten(1, (-1, 64)) * q.wscales.float().unsqueeze(-1)).flatten(1).to(BF16)
        start = 0
        for ours, theirs in pairs:
            rows = slice(start, start + sd.pop(f"{ours}.weight").shape[0])
            start = rows.stop
            sd.pop(f"{ours}.bias", None)
            linear = theirs if shift is None else f"{theirs}.linear"
            sd[f"{linear}.weight"], sd[f"{linear}.bias"] = residual[rows], q.bias[rows]
            scales[f"{linear}.weight.scale.0"] = q.wscales[rows].reshape(-1, 1, q.wscales.shape[1], 1)
            if shift is not None:
                sd[f"{theirs}.shift"] = torch.tensor([shift], dtype=BF16)
            where[ours] = {
                "linear": linear,
                "branch": key,
                "rows": rows,
                "smooth": smooth_key,
                "unsigned": shift is not None,
            }
        if smooth_key:
            smooths[smooth_key] = q.smooth_factor
        branches[key] = {"a.weight": q.proj_down, "b.weight": q.proj_up}

    def adanorm(name):
        w = sd[f"{name}.weight"].float().unflatten(1, (-1, 64))
        s = (w.abs().amax(-1) / 7).to(BF16)
        codes = torch.round(w / s.float().unsqueeze(-1)).clamp(-7, 8)  # their zero point is 7
        sd[f"{name}.weight"] = (codes * s.float().unsqueeze(-1)).flatten(1).to(BF16)
        scales[f"{name}.weight.scale.0"] = s.reshape(-1, 1, s.shape[1], 1)

    def wb(*mods):
        return torch.cat([m.weight for m in mods]).float(), torch.cat([m.bias for m in mods]).float()

    with torch.no_grad():
        for i, blk in enumerate(model.transformer_blocks):
            p, a = f"transformer_blocks.{i}", blk.attn
            out = f"{p}.attn.to_out.0"
            w_out, b_out = wb(a.to_out[0])
            s_out = _quantize(w_out, b_out, stats[out].act_max, rank=rank).smooth_factor  # both streams'
            for proj, key in (
                (("to_q", "to_k", "to_v"), "to_q"),
                (("add_q_proj", "add_k_proj", "add_v_proj"), "add_k_proj"),
            ):
                names = [f"{p}.attn.{n}" for n in proj]
                w, b = wb(*(getattr(a, n) for n in proj))
                if fuse:
                    v_rows = slice(2 * getattr(a, proj[0]).out_features, None)
                    w[v_rows] /= s_out.float().unsqueeze(1)  # the fused smoothing of the out projections
                    b[v_rows] /= s_out.float()
                q = _quantize(w, b, stats[names[0]].act_max, rank=rank)
                put([(n, n) for n in names], q, key=f"{p}.attn.{key}", smooth_key=f"{p}.attn.{key}")
                where[names[2]]["unfuse"] = s_out if fuse else None
            put([(out, out)], _quantize(w_out, b_out, None, rank=rank, smooth=s_out), key=out, smooth_key=out)
            add_out = f"{p}.attn.to_add_out"
            q = _quantize(*wb(a.to_add_out), None, rank=rank, smooth=s_out)
            put([(add_out, add_out)], q, key=add_out, smooth_key=out)  # to_out.0's (shared) smoothing
            for ff in ("ff", "ff_context"):
                fc1, fc2 = f"{p}.{ff}.net.0.proj", f"{p}.{ff}.net.2"
                net = getattr(blk, ff).net
                put(
                    [(fc1, fc1)],
                    _quantize(*wb(net[0].proj), stats[fc1].act_max, rank=rank),
                    key=fc1,
                    smooth_key=fc1,
                )
                q = _quantize(*wb(net[2]), stats[fc2].act_max + GELU_SHIFT, rank=rank, shift=GELU_SHIFT)
                put([(fc2, fc2)], q, key=f"{fc2}.linear", smooth_key=f"{fc2}.linear", shift=GELU_SHIFT)
            adanorm(f"{p}.norm1.linear")
            adanorm(f"{p}.norm1_context.linear")
        for i, blk in enumerate(model.single_transformer_blocks):
            p, a = f"single_transformer_blocks.{i}", blk.attn
            inner = blk.proj_out.in_features - blk.mlp_hidden_dim
            act = stats[f"{p}.proj_out"].act_max
            w_po, b_po = blk.proj_out.weight.float(), blk.proj_out.bias.float()
            s_out = _quantize(w_po[:, :inner], b_po, act[:inner], rank=rank).smooth_factor
            w_qkv, b_qkv = wb(a.to_q, a.to_k, a.to_v)
            if fuse:
                w_qkv[2 * inner :] /= s_out.float().unsqueeze(1)
                b_qkv[2 * inner :] /= s_out.float()
            w_mlp, b_mlp = wb(blk.proj_mlp)
            shared = _quantize(
                torch.cat([w_qkv, w_mlp]), None, stats[f"{p}.attn.to_q"].act_max, rank=rank
            ).smooth_factor
            names = [f"{p}.attn.to_q", f"{p}.attn.to_k", f"{p}.attn.to_v"]
            q = _quantize(w_qkv, b_qkv, None, rank=rank, smooth=shared)
            put([(n, n) for n in names], q, key=names[0], smooth_key=names[0])
            where[names[2]]["unfuse"] = s_out if fuse else None
            q = _quantize(w_mlp, b_mlp, None, rank=rank, smooth=shared)
            put([(f"{p}.proj_mlp",) * 2], q, key=f"{p}.proj_mlp", smooth_key=names[0])  # shares q/k/v's
            # proj_out is their two linears: the attention slice and the GELU slice (unsigned).
            sd[f"{p}.proj_out.parts.0.weight"] = sd[f"{p}.proj_out.parts.1.weight"] = sd.pop(
                f"{p}.proj_out.weight"
            )
            sd.pop(f"{p}.proj_out.bias")
            attn_part, mlp_part = f"{p}.proj_out.linears.0", f"{p}.proj_out.linears.1"
            q = _quantize(w_po[:, :inner], b_po, None, rank=rank, smooth=s_out)
            put([(f"{p}.proj_out.parts.0", attn_part)], q, key=attn_part, smooth_key=attn_part)
            q = _quantize(
                w_po[:, inner:], torch.zeros_like(b_po), act[inner:] + GELU_SHIFT, rank=rank, shift=GELU_SHIFT
            )
            key = f"{mlp_part}.linear"
            put([(f"{p}.proj_out.parts.1", mlp_part)], q, key=key, smooth_key=key, shift=GELU_SHIFT)
            adanorm(f"{p}.norm.linear")
    return (sd, scales, smooths, branches), where


KINDS = ("fused", "unfused")  # deepcompressor's smooth.proj.fuse_when_possible True (default) / False


@pytest.fixture(scope="module")
def packed(wide_model, tmp_path_factory):
    """Files written by deepcompressor's own converter, the way the published one was: one with
    the out projections' smoothing fused into v (its default), one without."""
    rank = 32
    stats = calibrate(wide_model, n_prompts=2, resolutions=((256, 256),), steps=1)
    config = {k: v for k, v in wide_model.transformer.config.items() if not k.startswith("_")}
    meta = {
        "config": json.dumps(config),
        "quantization_config": json.dumps({"method": "svdquant", "weight": {"dtype": "int4"}, "rank": rank}),
    }
    files = {}
    for kind in KINDS:
        dicts, where = deepcompressor_side(wide_model.transformer, stats, rank, fuse=kind == "fused")
        # Their converter adds the AdaLN +1 to the bias tensors it is given, in place: give it copies.
        blocks, other = convert_to_nunchaku_flux_state_dicts(*(copy.deepcopy(d) for d in dicts))
        path = tmp_path_factory.mktemp(f"dc-{kind}") / "svdq-int4_r32-flux.1-tiny.safetensors"
        save_file({**blocks, **other}, path, metadata=meta)
        files[kind] = (dicts, where, path)
    return files


@pytest.fixture(scope="module", params=KINDS)
def converted(packed, request):
    return packed[request.param]


def fused_where(where: dict) -> dict[str, list[dict]]:
    """``where`` (keyed by diffusers' layer names) regrouped by our layers: the siblings a fused
    layer of engine.flux.blocks holds, in its output order; every other layer alone."""
    grouped: dict[str, list[tuple[int, dict]]] = {}
    for name, at in where.items():
        block, rel = re.fullmatch(r"((?:single_)?transformer_blocks\.\d+)\.(.+)", name).groups()
        table = SINGLE_FUSED if block.startswith("single") else DOUBLE_FUSED
        fused, index = next(((f, sibs.index(rel)) for f, sibs in table.items() if rel in sibs), (rel, 0))
        grouped.setdefault(f"{block}.{fused}", []).append((index, at))
    return {name: [at for _, at in sorted(pieces, key=lambda p: p[0])] for name, pieces in grouped.items()}


@pytest.mark.slow
def test_every_layer_of_a_deepcompressor_file_loads_as_it_was_quantized(converted):
    (sd, scales, smooths, branches), where, path = converted
    model = load_transformer(path)
    w4a4 = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    w4a16 = {n: m for n, m in model.named_modules() if isinstance(m, W4A16Linear)}
    ours = fused_where(where)
    assert set(w4a4) == set(ours)
    assert {"transformer_blocks.0.attn.to_qkv", "single_transformer_blocks.0.to_qkv_mlp"} <= set(w4a4)
    assert set(w4a16) == {k.removesuffix(".weight.scale.0") for k in scales} - {
        w["linear"] for w in where.values()
    }
    for name, mod in w4a4.items():
        pieces = ours[name]
        codes, wscales, bias = [], [], []
        for at in pieces:
            w, s = sd[f"{at['linear']}.weight"], scales[f"{at['linear']}.weight.scale.0"].flatten(1)
            codes.append(torch.round(w.float().unflatten(1, (-1, 64)) / s.float().unsqueeze(-1)).flatten(1))
            b = sd[f"{at['linear']}.bias"].float()
            if at.get("unfuse") is not None:  # value rows of a fused file: times the out smoothing
                s = (s.float() * at["unfuse"].float().unsqueeze(1)).to(BF16)
                b = (b * at["unfuse"].float()).to(BF16).float()
            wscales.append(s)
            bias.append(b)
        assert {at["unsigned"] for at in pieces} == {mod.unsigned}, name
        assert torch.equal(unpack_int4(mod.qweight).float(), torch.cat(codes)), name
        assert torch.equal(mod.wscales, torch.cat(wscales)), name
        # One low-rank branch per branch of theirs: downs stacked, each up in its own rows and
        # columns (one branch: the plain rows of its up).
        keys = list(dict.fromkeys(at["branch"] for at in pieces))
        cols, start = {}, 0
        for key in keys:
            cols[key] = slice(start, start + branches[key]["a.weight"].shape[0])
            start = cols[key].stop
        up = torch.zeros(mod.out_features, start, dtype=mod.proj_up.dtype)
        row = 0
        for at in pieces:
            n = at["rows"].stop - at["rows"].start
            b = branches[at["branch"]]["b.weight"][at["rows"]]
            if at.get("unfuse") is not None:
                b = (b.float() * at["unfuse"].float().unsqueeze(1)).to(b.dtype)
            up[row : row + n, cols[at["branch"]]] = b
            row += n
        assert torch.equal(mod.proj_up, up), name
        down = torch.cat([branches[key]["a.weight"] for key in keys])
        # Our down factor reads the smoothed input, as theirs did before their packer divided
        # it by the smoothing factor: two bf16 roundings at most.
        assert torch.allclose(mod.proj_down.float(), down.float(), rtol=2**-7, atol=1e-6), name
        # Out projections too: a fused file's are un-fused at load (their smooth_orig).
        assert len({at["smooth"] for at in pieces}) == 1, name  # one smoothing factor: fusable
        assert torch.equal(mod.smooth_factor, smooths[pieces[0]["smooth"]]), name
        bias = torch.cat(bias)
        assert ((mod.bias.float() - bias).abs() <= 2**-7 * bias.abs() + 2e-3).all(), name
    for name, mod in w4a16.items():
        # Their rows are reordered and their +1 folded into the bias; ours are diffusers' again.
        assert relative_error(mod.dequantized_weight(torch.float32), sd[f"{name}.weight"].float()) < 5e-3, (
            name
        )
        assert torch.allclose(mod.bias.float(), sd[f"{name}.bias"].float(), atol=2**-7), name


@pytest.mark.slow
def test_deepcompressor_file_computes_what_the_float_model_computes(wide_model, converted):
    *_, path = converted
    loaded = params_to_float(load_transformer(path))
    inputs = first_step_inputs(wide_model, "a fox")
    err = relative_error(velocity(loaded, inputs), velocity(wide_model.transformer, inputs))
    # Measured 0.0122: the W4A4 r32 error of this model. Read with bias and smooth in the wrong
    # order (the first converter), the issue measured about 0.26 on such a file.
    assert err < 0.03, err


@pytest.mark.slow
def test_which_kind_of_file_is_detected_and_logged(packed, caplog):
    """Fused: out-projection smooth all ones, smooth_orig not; every attention block un-fused."""
    import logging

    from safetensors import safe_open

    for kind in KINDS:
        path = packed[kind][2]
        with safe_open(str(path), framework="pt") as f:
            c = nk.convert_state_dict({k: f.get_tensor(k) for k in f.keys()}, f.metadata())  # noqa: SIM118
        blocks = [f"transformer_blocks.{i}" for i in range(2)] + [
            f"single_transformer_blocks.{i}" for i in range(2)
        ]
        assert c.smooth_fused_blocks == (sorted(blocks) if kind == "fused" else []), kind
        with caplog.at_level(logging.INFO, logger="engine.flux.checkpoint"):
            caplog.clear()
            load_transformer(path)
        expect = (
            "out-projection smoothing fused into v in 4 of 4 blocks"
            if kind == "fused"
            else "smoothing NOT fused"
        )
        assert f"INT4 W4A4, rank 32, group size 64, bfloat16; {expect}" in caplog.text, caplog.text


# --- LoRAs on both kinds of file, against diffusers/PEFT on the float model --------------------

LORA_RANK = 16
D_WIDE = 128  # the wide model's inner width (2 heads x 64)
# group -> (its layer in every block, (in, out), amplitude of lora_B): amplitudes chosen so that
# each group's LoRA moves the output by about 0.3 (relative), far above the files' quantization
# error (0.012), whose interplay with the change is what the errors measure.
LORA_GROUPS = {
    "to_v": ("transformer_blocks.{i}.attn.to_v", (D_WIDE, D_WIDE), 18.0),
    "add_v_proj": ("transformer_blocks.{i}.attn.add_v_proj", (D_WIDE, D_WIDE), 4.5),
    "to_out": ("transformer_blocks.{i}.attn.to_out.0", (D_WIDE, D_WIDE), 3.0),
    "to_add_out": ("transformer_blocks.{i}.attn.to_add_out", (D_WIDE, D_WIDE), 100.0),
    "single_to_v": ("single_transformer_blocks.{i}.attn.to_v", (D_WIDE, D_WIDE), 11.0),
    "single_proj_out": ("single_transformer_blocks.{i}.proj_out", (5 * D_WIDE, D_WIDE), 4.5),
    "to_q": ("transformer_blocks.{i}.attn.to_q", (D_WIDE, D_WIDE), 60.0),  # control: not fused
}


def lora_file(group: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """A random rank-16 diffusers/PEFT LoRA on ``group``'s layer in both blocks."""
    gen = torch.Generator().manual_seed(seed)
    pattern, (k, n), amp = LORA_GROUPS[group]
    sd = {}
    for i in range(2):
        name = pattern.format(i=i)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(LORA_RANK, k, generator=gen) / k**0.5
        sd[f"transformer.{name}.lora_B.weight"] = (
            amp * torch.randn(n, LORA_RANK, generator=gen) / LORA_RANK**0.5
        )
    return sd


@pytest.fixture(scope="module")
def lora_setting(wide_model, packed):
    """Inputs, the float model's output, and both kinds of file loaded (float remainder)."""
    inputs = first_step_inputs(wide_model, "a fox")
    models = {kind: params_to_float(load_transformer(packed[kind][2])) for kind in KINDS}
    bases = {kind: velocity(m, inputs) for kind, m in models.items()}
    return inputs, velocity(wide_model.transformer, inputs), models, bases


def peft_reference(wide_model, sd, scale, inputs) -> torch.Tensor:
    """The float model with the LoRA loaded and fused by diffusers (PEFT), on a copy."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**{**wide_model.components, "transformer": copy.deepcopy(wide_model.transformer)})
    pipe.load_lora_weights({k: v.clone() for k, v in sd.items()})
    pipe.fuse_lora(lora_scale=scale)
    return velocity(pipe.transformer, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("group", list(LORA_GROUPS))
def test_lora_changes_a_fused_file_as_an_unfused_one(wide_model, lora_setting, group):
    """The issue's measurement: a LoRA's change of the output against diffusers/PEFT's change on
    the float model. Before un-fusing, a fused file gave to_v 1.78 (unfused 0.16), add_v_proj
    1.70, to_out 0.67, single to_v 3.00, single proj_out 0.26 (issue 25; with these amplitudes
    and the un-fusing switched off, to_v 1.73 against 0.19). Measured fused / unfused with it:
    to_v 1.00, add_v_proj 0.97, to_out 1.13, to_add_out 0.93, single to_v 0.95, single proj_out
    1.03, to_q 1.00."""
    from engine.lora import LoraManager, parse_lora

    inputs, base_float, models, bases = lora_setting
    scale = 1.0
    sd = lora_file(group)
    change_ref = peft_reference(wide_model, sd, scale, inputs) - base_float
    err = {}
    for kind, model in models.items():
        manager = LoraManager(model)
        manager.set([("g", parse_lora(sd, model), scale)])
        try:
            err[kind] = relative_error(velocity(model, inputs) - bases[kind], change_ref)
        finally:
            manager.clear()
    assert err["unfused"] < 0.5, err  # the LoRA's change is reproduced at all
    assert err["fused"] <= 1.3 * err["unfused"], err
