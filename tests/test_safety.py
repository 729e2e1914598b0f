"""Replicate's two-opinion safety check (replicate/cog-flux predict.py, ``postprocess``): an image
is dropped only when the Stable Diffusion safety checker flags it AND the Falconsai ViT
classifier does not call it "normal" (a failing classifier confirms the flag). Tiny random
stand-ins of both models, built here, whose verdicts are forced by their last layers."""

import logging

import pytest
import torch
from PIL import Image

from engine.safety import CLASSIFIER_DIR, NSFWClassifier, SafetyChecker
from engine.weights import load_manifest

from .test_service import tiny_safety_checker

FLAG_ALL, FLAG_NONE = -10.0, 10.0  # the SD checker's concept thresholds


def tiny_vit_config(**overrides):
    """A one-layer ViT with Falconsai/nsfw_image_detection's labels, 32 pixels; ``overrides`` win."""
    from transformers import ViTConfig

    kw = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
        "num_labels": 2,
        "id2label": {0: "normal", 1: "nsfw"},  # Falconsai/nsfw_image_detection's config
        "label2id": {"normal": 0, "nsfw": 1},
    }
    return ViTConfig(**{**kw, **overrides})


def tiny_classifier(path, verdict: str) -> None:
    """A ViT classifier with Falconsai's labels whose top label is ``verdict`` for every image."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    cfg = tiny_vit_config()
    torch.manual_seed(0)
    model = ViTForImageClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([10.0, -10.0] if verdict == "normal" else [-10.0, 10.0]))
    model.save_pretrained(path / CLASSIFIER_DIR)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path / CLASSIFIER_DIR)


def checker(tmp_path, sd: float, classifier: str | None) -> SafetyChecker:
    path = tmp_path / f"{sd}-{classifier}"
    if classifier is not None:
        tiny_classifier(path, classifier)
    return tiny_safety_checker(path, threshold=sd)


def images(n: int = 3) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(1)
    return [
        Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("sd", "classifier", "dropped"),
    [
        (FLAG_ALL, "nsfw", True),  # both flag: dropped
        (FLAG_ALL, "normal", False),  # the classifier overrules the checker: kept
        (FLAG_NONE, "nsfw", False),  # the classifier alone never drops
        (FLAG_NONE, "normal", False),
        (FLAG_ALL, None, True),  # no classifier weights: the checker alone
    ],
)
def test_an_image_is_dropped_only_when_both_flag_it(tmp_path, sd, classifier, dropped):
    c = checker(tmp_path, sd, classifier)
    assert (c.classifier is not None) == (classifier is not None)
    assert c.flags(images()) == [dropped] * 3


def test_the_classifier_sees_only_flagged_images_in_order(tmp_path):
    """Per image: the classifier runs on what the checker flagged (as Replicate's, image by image)
    and its verdicts land on those images."""
    c = checker(tmp_path, FLAG_ALL, "nsfw")
    seen = []

    def safe(batch):
        seen.append(len(batch))
        return [False, True, False][: len(batch)]

    c.classifier.safe = safe
    assert c.flags(images()) == [True, False, True]
    assert seen == [3]
    c = checker(tmp_path, FLAG_NONE, "nsfw")
    c.classifier.safe = safe
    assert c.flags(images()) == [False] * 3 and seen == [3]  # nothing flagged: not run


def test_a_failing_classifier_confirms_the_flag(tmp_path, caplog):
    c = checker(tmp_path, FLAG_ALL, "normal")

    def broken(batch):
        raise RuntimeError("out of memory")

    c.classifier.safe = broken
    with caplog.at_level(logging.ERROR, logger="engine.safety"):
        assert c.flags(images(2)) == [True, True]
    assert "NSFW classifier failed" in caplog.text


def test_missing_classifier_is_said_at_setup(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.safety"):
        checker(tmp_path, FLAG_ALL, None)
    assert "NSFW classifier not loaded" in caplog.text


def test_classifier_without_a_normal_label_is_refused(tmp_path):
    from transformers import ViTForImageClassification, ViTImageProcessor

    cfg = tiny_vit_config(id2label={0: "sfw", 1: "porn"}, label2id={"sfw": 0, "porn": 1})
    ViTForImageClassification(cfg).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="have no 'normal'"):
        NSFWClassifier.load(tmp_path, torch.device("cpu"))


def test_manifest_fetches_falconsai_classifier():
    entries = {e.path: e for e in load_manifest("flux-schnell")}
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        entry = entries[f"{CLASSIFIER_DIR}/{name}"]
        assert entry.hub == "Falconsai/nsfw_image_detection" and entry.file == name
