"""The image model's detection of issue 26's post-denoising levers (perfmodel.image): each reads
the code, so undoing the lever in the code turns its row back to "no" and its saving out of the
totals."""

from __future__ import annotations

import dataclasses

import numpy as np
from perfmodel import image as image_model
from perfmodel import image_price

from engine import go_fast, safety


def test_vae_compiled_is_read_from_go_fast(monkeypatch):
    assert image_model.vae_compiled()
    settings = go_fast.CompileSettings
    monkeypatch.setattr(go_fast, "CompileSettings", lambda: dataclasses.replace(settings(), vae=False))
    assert not image_model.vae_compiled()


def test_safety_input_on_gpu_is_read_from_the_checker(monkeypatch):
    assert image_model.safety_input_on_gpu()

    def host_flags(self, images):  # the path before issue 26: the processor on the host
        clip_input = self.processor(images=[np.asarray(im.cpu()) for im in images], return_tensors="pt")
        return self.checker(images=None, clip_input=clip_input.pixel_values)[1]

    monkeypatch.setattr(safety.SafetyChecker, "flags", host_flags)
    assert not image_model.safety_input_on_gpu()


def test_postprocess_stage_moves_the_safety_input_to_the_gpu():
    host = image_price.postprocess_stage(1, 1024)
    gpu = image_price.postprocess_stage(1, 1024, safety_on_gpu=True)
    for d in host.seconds:
        assert (
            gpu.detail[d]["CPU"] < host.detail[d]["CPU"]
            and gpu.detail[d]["GPU + copy"] > host.detail[d]["GPU + copy"]
        )
        assert gpu.seconds[d] < host.seconds[d]


def test_vae_subpixel_is_read_from_the_pipeline_and_traced(monkeypatch):
    """The served decoder's three upsamplers are traced as sub-pixel convolutions: no nearest
    upsampling, and the decoder's FLOPs fall by exactly the 3x3 convolutions' at the high resolution
    less the 2x2 convolutions' (4 Cout outputs on (H + 1) x (W + 1)) at the low one."""
    from perfmodel import image_trace

    from engine import vae_upsample

    assert image_model.vae_subpixel()
    stock, sub = image_trace.trace_vae(1, 1024), image_trace.trace_vae(1, 1024, subpixel=True)
    assert sum(op.name == "aten.upsample_nearest2d" for op in stock) == 3
    assert not any(op.name == "aten.upsample_nearest2d" for op in sub)
    levels = [(512, 128), (512, 256), (256, 512)]  # FLUX's upsamplers: (channels, low-res side) at 1024
    before = sum(2 * 9 * c * c * (2 * s) ** 2 for c, s in levels)
    after = sum(2 * 4 * c * 4 * c * (s + 1) ** 2 for c, s in levels)
    assert sum(op.flops for op in stock) - sum(op.flops for op in sub) == before - after
    monkeypatch.setattr(vae_upsample, "ineligible", lambda up: "not eligible")  # nothing swapped
    assert not image_model.vae_subpixel()
