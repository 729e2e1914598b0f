"""The safety models' input prepared on the device, in torch: what transformers' image processors
(``CLIPImageProcessor`` for the Stable Diffusion safety checker, ``ViTImageProcessor`` for
Falconsai's classifier) compute on the host from PIL images, computed from the uint8 images
where they already are (the GPU, after ``engine.pipeline.to_uint8``).

Why: the host path converts each 1024x1024 image to float32 numpy and resizes it with PIL, about
18 bytes per pixel value through one CPU thread (issue 26's modelled 14 ms per image on an A40);
on the GPU it is one small kernel per step, and only the 224x224 result is ever read back.

The steps are the processor's own, with its own settings (read from the loaded processor, never
restated): resize (PIL's antialiased bicubic or bilinear: torch's ``antialias=True`` filters
are PIL's, a = -0.5 for bicubic), the output rounded to uint8 as PIL's is, center crop, rescale,
normalize. What differs is the arithmetic of the resize: PIL filters in 22-bit fixed point and
rounds to uint8 between its horizontal and vertical passes, torch filters in float32 in one
go, so a resized pixel may differ by a rounding step (tests/test_safety_input.py bounds it
against the real processor and shows the checker's verdicts unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# PIL's resampling filters (PIL.Image.Resampling values, as the processors store them) that have
# an antialiased torch twin; the processors we load use BICUBIC (CLIP) and BILINEAR (ViT).
TORCH_MODES = {2: "bilinear", 3: "bicubic"}


def check_processor(processor, name: str) -> None:
    """Refuse, at load, a processor whose steps :func:`pixel_values` does not reproduce."""
    resample = int(processor.resample) if processor.do_resize else None
    if processor.do_resize and resample not in TORCH_MODES:
        raise ValueError(
            f"{name}: resample={processor.resample!r} is not supported on the device "
            f"(supported: {sorted(TORCH_MODES)}, PIL's BILINEAR and BICUBIC)"
        )
    size = processor.size
    if processor.do_resize and not (size.shortest_edge or (size.height and size.width)):
        raise ValueError(f"{name}: size={size!r}: give shortest_edge, or height and width")
    if processor.do_resize and size.shortest_edge and size.longest_edge:
        raise ValueError(f"{name}: size={size!r}: a longest_edge bound is not supported on the device")
    if getattr(processor, "do_pad", None):
        raise ValueError(f"{name}: do_pad is not supported on the device")


def resized_size(height: int, width: int, processor) -> tuple[int, int]:
    """The processor's resize target for an image of ``height x width``, by transformers' own rule."""
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    size = processor.size
    if size.shortest_edge:
        shape = torch.empty(3, height, width, device="meta")  # only its shape is read
        return tuple(
            get_resize_output_image_size(
                shape, size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        )
    return size.height, size.width


def horizontal_first(height: int, width: int, h: int, w: int) -> bool:
    """Whether PIL resizes ``height x width`` to ``h x w`` width first. Pillow 13
    (libImaging/Resample.c, ImagingResampleInner): height first when it shrinks by more than
    twice as many pixels as the width; before 13: always width first."""
    import PIL

    if int(PIL.__version__.split(".")[0]) < 13:
        return True
    return not (height - h > 0 and height - h > 2 * (width - w))


def pixel_values(images: torch.Tensor, processor) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 images (any device) as ``processor(images).pixel_values`` would be:
    ``[B, 3, h, w]`` float32 on the images' device (``h, w``: the crop, or the resize target)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected [B, H, W, 3] uint8 RGB, got {tuple(images.shape)} {images.dtype}")
    x = images.permute(0, 3, 1, 2).float()  # [B, 3, H, W], 0..255
    if processor.do_resize:
        h, w = resized_size(x.shape[2], x.shape[3], processor)
        mode = TORCH_MODES[int(processor.resample)]
        # PIL's two passes in PIL's order, each rounded to uint8 (half up) as PIL's are
        height, width = x.shape[2], x.shape[3]
        first = (height, w) if horizontal_first(height, width, h, w) else (h, width)
        for size in (first, (h, w)):
            if tuple(x.shape[2:]) != size:
                x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
                x = x.add_(0.5).floor_().clamp_(0, 255)
    if getattr(processor, "do_center_crop", False):
        ch, cw = processor.crop_size.height, processor.crop_size.width
        h, w = x.shape[2], x.shape[3]
        if ch > h or cw > w:
            raise ValueError(f"crop_size {ch}x{cw} is larger than the resized image {h}x{w}")
        top, left = (h - ch) // 2, (w - cw) // 2  # transformers' center_crop
        x = x[:, :, top : top + ch, left : left + cw]
    if processor.do_rescale:
        x = x * processor.rescale_factor
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.contiguous()
