"""The numpy fp8 scaling (autoprec.core.fp8, the ONNX side) is bit-identical to the torch emulation's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoprec.core import fp8
from autoprec.core.formats import Precision
from autoprec.torch import quantize
from autoprec.torch.passes.ops import fp8_codes

FP8 = [Precision.FP8_E4M3, Precision.FP8_E5M2]


@pytest.mark.parametrize("fmt", FP8)
def test_scales_and_codes_match_torch_bit_for_bit(fmt):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 3, 5)) * np.exp(rng.uniform(-12, 8, (64, 1, 1)))).astype(np.float32)
    w[3] = 0.0  # an all-zero channel: scale 1
    w[5, 0, 0] = np.inf  # a non-finite amax: scale 1, codes saturate (E4M3FN) or overflow (E5M2)
    wt = torch.from_numpy(w)
    s_np = fp8.fp8_scale(fp8.channel_amax(w), fmt)
    s_t = quantize.fp8_scale(quantize.channel_amax(wt), fmt)
    assert np.array_equal(s_np, s_t.numpy())
    codes_np = fp8.fp8_codes(w, s_np, fmt)
    codes_t = fp8_codes(wt, s_t, fmt)
    bits_t = codes_t.view(torch.uint8).numpy()
    assert np.array_equal(codes_np.view(np.uint8), bits_t)


@pytest.mark.parametrize("groups", [1, 3])
def test_transposed_conv_channel_amax_matches_torch(groups):
    """A transposed convolution's [C_in, C_out/groups, k...] weight: one amax per (group, column),
    the same in numpy and torch, and each the amax of that output channel's weights."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((6, 4, 3, 2)) * np.exp(rng.uniform(-6, 6, (6, 4, 1, 1)))).astype(np.float32)
    channels = fp8.Channels(axis=1, groups=groups)
    got = fp8.channel_amax(w, channels)
    assert got.shape == (6, 4, 1, 1)
    assert np.array_equal(got, quantize.channel_amax(torch.from_numpy(w), channels).numpy())
    rows = 6 // groups
    for g in range(groups):
        for j in range(4):
            assert (got[g * rows:(g + 1) * rows, j] == np.abs(w[g * rows:(g + 1) * rows, j]).max()).all()
    with pytest.raises(ValueError):
        fp8.Channels(axis=0, groups=2)  # groups split axis 0 only for channels on axis 1


@pytest.mark.parametrize("amax", [0.0, -1.0, float("nan"), float("inf"), 1e-30, 3.0, 1e30])
def test_scalar_scales_match_torch(amax):
    for fmt in FP8:
        assert float(fp8.fp8_scale(amax, fmt)) == float(quantize.fp8_scale(amax, fmt))
