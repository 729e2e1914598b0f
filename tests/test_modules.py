"""SVDQLinear and W4A16Linear: forward, state dict, LoRA slots, errors."""

import pytest
import torch
from torch import nn

from engine.modules import SVDQLinear, W4A16Linear
from engine.quant import relative_error
from engine.quant.synthetic import outlier_activations


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    calib = outlier_activations(128, 256)
    return lin, SVDQLinear.from_linear(lin, calib, rank=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_any_leading_shape_and_dtype(quantized, dtype):
    lin, q = quantized
    x = outlier_activations(24, 256, sample_seed=2).reshape(2, 3, 4, 256)
    y = q(x.to(dtype))
    assert y.shape == (2, 3, 4, 96) and y.dtype == dtype
    assert relative_error(y, lin(x)) < 0.08  # measured 0.045 (bf16 ~0.046)


def test_state_dict_has_checkpoint_names(quantized):
    _, q = quantized
    sd = q.state_dict()
    assert set(sd) == {"qweight", "wscales", "smooth_factor", "proj_down", "proj_up", "bias"}
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (96, 128)
    assert sd["wscales"].shape == (96, 4) and sd["proj_down"].shape == (16, 256)
    fresh = SVDQLinear(256, 96, rank=16)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 256)
    assert torch.equal(fresh(x), q(x))


def test_lora_slot_adds_and_removes_exactly(quantized):
    _lin, q = quantized
    x = outlier_activations(33, 256, sample_seed=4)
    base = q(x)
    a, b = torch.randn(8, 256) / 16, torch.randn(96, 8) / 8
    q.add_lora("style", a, b, scale=0.7)
    with_lora = q(x)
    expected = base.float() + 0.7 * (x @ a.T) @ b.T
    # bf16 factors: the branch's own rounding, relative to the LoRA's contribution.
    assert relative_error(with_lora - base, expected - base) < 1e-2
    q.add_lora("other", a, -b, scale=0.7)  # cancels the first
    assert relative_error(q(x), base) < 1e-2
    q.remove_lora("other")
    q.remove_lora("style")
    assert q.lora_names == [] and torch.equal(q(x), base)
    with pytest.raises(KeyError, match="no LoRA named"):
        q.remove_lora("style")
    with pytest.raises(ValueError, match="down must have shape"):
        q.add_lora("bad", torch.randn(4, 100), torch.randn(96, 4))


def test_lora_on_unsigned_layer_corrects_the_shift():
    torch.manual_seed(3)
    lin = nn.Linear(128, 32)
    x = nn.functional.gelu(torch.randn(64, 128) * 2, approximate="tanh")
    q = SVDQLinear.from_linear(lin, x, rank=8, unsigned=True, act_shift=0.171875, dtype=torch.float32)
    base = q(x)
    a, b = torch.randn(4, 128) / 11, torch.randn(32, 4) / 2
    q.add_lora("l", a, b, scale=1.5)
    torch.testing.assert_close(q(x) - base, 1.5 * (x @ a.T) @ b.T, rtol=1e-4, atol=1e-4)
    q.clear_loras()
    assert torch.equal(q(x), base)


def test_constructor_errors():
    with pytest.raises(ValueError, match="in_features=100 must be a multiple of group_size=64"):
        SVDQLinear(100, 8)
    with pytest.raises(ValueError, match="act_shift"):
        SVDQLinear(64, 8, act_shift=0.1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        W4A16Linear(65, 8)


def test_w4a16_linear():
    torch.manual_seed(0)
    lin = nn.Linear(192, 64).to(torch.bfloat16)
    q = W4A16Linear.from_linear(lin)
    assert set(q.state_dict()) == {"qweight", "wscales", "wzeros", "bias"}
    x = torch.randn(3, 192, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, lin(x)) < 0.1  # 4-bit uniform weights: measured 0.06
    with pytest.raises(ValueError, match="last dimension 192"):
        q(torch.randn(3, 128, dtype=torch.bfloat16))


def test_wscales_stay_group_major_through_load_and_move(tmp_path):
    """The GPU kernels read a group's scales for a tile of outputs in one coalesced load."""
    from engine.modules import SVDQLinear

    layer = SVDQLinear.from_linear(torch.nn.Linear(128, 48), torch.randn(32, 128), rank=8)
    assert layer.wscales.stride() == (1, 48)
    state = {k: v.contiguous() for k, v in layer.state_dict().items()}  # as a file holds it
    fresh = SVDQLinear(128, 48, rank=8)
    fresh.load_state_dict(state, assign=True)
    assert fresh.wscales.stride() == (1, 48) and fresh.to(torch.float32).wscales.stride() == (1, 48)
    x = torch.randn(5, 128)
    assert torch.equal(fresh(x), layer(x))
