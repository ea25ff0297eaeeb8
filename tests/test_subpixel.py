"""A 2x nearest upsampling followed by a 3x3 convolution, rewritten as four 2x2 convolutions
for the converted graphs: the same function (to float32 rounding) wherever it applies, the
module's own forward wherever it does not, and nothing left on the module afterwards."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from fewstep.accel.subpixel import eligible, phase_kernels, rewritten_upsampling


def _upsampler(channels=6, out_channels=None, **options):
    torch.manual_seed(0)
    module = Upsample2D(channels, use_conv=True, out_channels=out_channels, **options).eval()
    with torch.no_grad():  # weights far from zero: a wrong tap would show
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("out_channels,batch,size", [(None, 1, (4, 4)), (9, 2, (5, 7)),
                                                     (3, 3, (1, 6))])
def test_the_rewritten_upsampling_is_the_same_function(out_channels, batch, size):
    module = _upsampler(out_channels=out_channels)
    x = torch.randn(batch, 6, *size)
    with torch.no_grad():
        expected = module(x)
        with rewritten_upsampling(module) as count:
            got = module(x)
            with_size = module(x, output_size=(2 * size[0], 2 * size[1]))
    assert count == 1
    assert got.shape == expected.shape == (batch, out_channels or 6, 2 * size[0], 2 * size[1])
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-5 * scale
    assert (with_size - expected).abs().max().item() <= 1e-5 * scale
    assert "forward" not in vars(module)  # the class's forward again
    assert torch.equal(module(x), expected)


def test_the_kernels_sum_the_taps_each_phase_sees():
    weight = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)  # rows 0-2: 0 1 2 / 3 4 5 / 6 7 8
    top_left, top_right, bottom_left, bottom_right = (k[0, 0].tolist() for k in phase_kernels(weight))
    # phase (0, 0): kernel row 0 on input row i-1, rows 1+2 on row i; the same for columns
    assert top_left == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert top_right == [[0 + 1, 2], [3 + 4 + 6 + 7, 5 + 8]]
    assert bottom_left == [[0 + 3, 1 + 2 + 4 + 5], [6, 7 + 8]]
    assert bottom_right == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_another_output_size_runs_the_modules_own_forward():
    module = _upsampler()
    x = torch.randn(1, 6, 5, 7)
    with torch.no_grad():
        expected = module(x, output_size=(11, 15))  # not a doubling: diffusers interpolates
        with rewritten_upsampling(module):
            got = module(x, output_size=(11, 15))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("options", [dict(use_conv=False), dict(use_conv_transpose=True),
                                     dict(use_conv=True, kernel_size=1, padding=0),
                                     dict(use_conv=True, interpolate=False)])
def test_other_upsamplers_are_left_alone(options):
    torch.manual_seed(0)
    module = Upsample2D(4, **options).eval()
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        expected = module(x)
        with rewritten_upsampling(module) as count:
            assert count == 0 and not eligible(module) and "forward" not in vars(module)
            assert torch.equal(module(x), expected)


def test_the_modules_forward_is_back_after_an_error():
    parent = torch.nn.Sequential(_upsampler(), _upsampler())
    with pytest.raises(RuntimeError, match="conversion failed"):
        with rewritten_upsampling(parent) as count:
            assert count == 2 and all("forward" in vars(m) for m in parent)
            raise RuntimeError("conversion failed")
    assert not any("forward" in vars(m) for m in parent)
