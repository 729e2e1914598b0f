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
