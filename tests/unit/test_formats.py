"""Format emulation must be bit-exact to ml_dtypes (DESIGN.md: numerical semantics)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from autoprec.core.errors import UsageError
from autoprec.core.formats import Precision, parse_precision, parse_precisions, wider
from autoprec.torch.quantize import channel_amax, fp8_scale, quantize

LOW = [Precision.BF16, Precision.FP16, Precision.FP8_E4M3, Precision.FP8_E5M2]


def reference(x: np.ndarray, p: Precision) -> np.ndarray:
    """ml_dtypes' rounding of fp32 values, with E4M3FN saturation (DESIGN.md) applied first."""
    x = x.astype(np.float32)
    if p is Precision.FP8_E4M3:
        x = np.where(np.isnan(x), x, np.clip(x, -448.0, 448.0)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(p.numpy_dtype).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal bit patterns, with every NaN counted equal to every NaN."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    both_nan = np.isnan(a32) & np.isnan(b32)
    return both_nan | (a32.view(np.uint32) == b32.view(np.uint32))


def emulate(x: np.ndarray, p: Precision) -> np.ndarray:
    return quantize(torch.from_numpy(x.astype(np.float32)), p).numpy()


@pytest.mark.parametrize("p", [Precision.FP16, Precision.BF16])
def test_every_16bit_code_point_round_trips(p: Precision) -> None:
    codes = np.arange(2**16, dtype=np.uint16).view(p.numpy_dtype).astype(np.float32)
    assert same_bits(emulate(codes, p), codes).all()


@pytest.mark.parametrize("p", [Precision.FP8_E4M3, Precision.FP8_E5M2])
def test_all_256_fp8_codes_round_trip(p: Precision) -> None:
    codes = np.arange(256, dtype=np.uint8).view(p.numpy_dtype).astype(np.float32)
    assert same_bits(emulate(codes, p), codes).all()


def _midpoints(p: Precision) -> np.ndarray:
    """Exact ties between neighbouring codes of ``p`` (representable in fp32 for all formats)."""
    n = 2 ** p.bits
    raw = np.arange(n, dtype=np.uint16 if n > 256 else np.uint8).view(p.numpy_dtype)
    with np.errstate(invalid="ignore"):
        codes = raw.astype(np.float64)
    vals = np.unique(codes[np.isfinite(codes)])
    mids = (vals[:-1] + vals[1:]) / 2
    return mids.astype(np.float32)


@pytest.mark.parametrize("p", LOW)
def test_ties_round_to_even(p: Precision) -> None:
    mids = _midpoints(p)
    assert (mids.astype(np.float64) == (mids.astype(np.float32)).astype(np.float64)).all()
    assert same_bits(emulate(mids, p), reference(mids, p)).all()
    # and the next fp32 value on each side of every tie
    for direction in (np.inf, -np.inf):
        nb = np.nextafter(mids, np.float32(direction)).astype(np.float32)
        assert same_bits(emulate(nb, p), reference(nb, p)).all()


@pytest.mark.parametrize("p", LOW)
def test_fp32_sweep_random_bit_patterns(p: Precision) -> None:
    rng = np.random.default_rng(1234)
    bits = rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    assert same_bits(emulate(x, p), reference(x, p)).all()


@pytest.mark.parametrize("p", LOW)
def test_special_values(p: Precision) -> None:
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-40, 6e-8, 3e-8, 2.9802322e-08,
         65504.0, 65519.996, 65520.0, 1e5, -1e5, 448.0, 464.0, 480.0, 57344.0, 61440.0, 3.4e38,
         3.3895314e38, 3.3961776e38, 1.0, 1.0 + 2**-8, 1.0 + 2**-11, 0.001953125, 0.0009765625],
        dtype=np.float32,
    )
    out = emulate(specials, p)
    assert same_bits(out, reference(specials, p)).all()
    # signed zeros survive
    assert np.signbit(out[1]) and not np.signbit(out[0])


def test_overflow_semantics() -> None:
    x = np.array([1e5, -1e5, 7e4], dtype=np.float32)
    assert np.isinf(emulate(x, Precision.FP16)).all()
    assert (emulate(x, Precision.FP8_E4M3) == np.array([448, -448, 448], dtype=np.float32)).all()
    assert np.isinf(emulate(np.array([6.2e4], dtype=np.float32), Precision.FP8_E5M2)).all()
    assert np.isinf(emulate(np.array([3.4e38], dtype=np.float32), Precision.BF16)).all()


def test_format_properties_match_ml_dtypes() -> None:
    for p in LOW + [Precision.FP32]:
        fi = ml_dtypes.finfo(p.numpy_dtype)
        assert p.max == float(fi.max)
        assert p.min_normal == float(fi.smallest_normal)
        assert p.min_subnormal == float(fi.smallest_subnormal)
        assert p.eps == float(fi.eps)
        assert p.bits == fi.bits
        assert p.info.mantissa_bits == fi.nmant
    assert Precision.FP16.torch_dtype is torch.float16
    assert Precision.FP8_E4M3.torch_dtype is torch.float8_e4m3fn
    import onnx

    assert Precision.BF16.onnx_type == onnx.TensorProto.BFLOAT16
    assert Precision.FP8_E4M3.onnx_type == onnx.TensorProto.FLOAT8E4M3FN


def test_per_tensor_scale_matches_scaled_reference() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 50).astype(np.float32)
    amax = float(np.abs(x).max())
    scale = fp8_scale(amax)
    out = quantize(torch.from_numpy(x), Precision.FP8_E4M3, scale).numpy()
    s = np.float32(scale.item())
    ref = reference((x / s).astype(np.float32), Precision.FP8_E4M3) * s
    assert same_bits(out, ref.astype(np.float32)).all()
    assert np.abs(out).max() <= amax * (1 + 1e-6)


@pytest.mark.parametrize("with_nan", [False, True])
def test_e4m3_read_back_by_moving_bits_is_the_conversion_bit_for_bit(with_nan: bool) -> None:
    """E4M3 codes are read back on the CPU by moving their bits into an fp16's, a scale folded into
    the one multiplication after: the same bits as ml_dtypes' rounding times the scale, for every
    code, the saturating and special values (a tensor holding NaN goes through torch's conversion),
    scales whose products are fp32 subnormals, per-channel scales, and a non-contiguous input."""
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    special = np.array([np.inf, -np.inf, 448.0, 449.0, 464.0, -1e30, 0.0, -0.0, 2.0 ** -10, 3 * 2.0 ** -11,
                        -(2.0 ** -10), 1e-30, -1e-30], dtype=np.float32)
    rng = np.random.default_rng(1)
    x = np.concatenate([codes, special, (rng.standard_normal(1195) * 100).astype(np.float32)])
    if not with_nan:
        x = np.where(np.isnan(x), np.float32(1.0), x)
    x = x.reshape(24, 61)
    t = torch.from_numpy(x).t()  # non-contiguous
    assert same_bits(quantize(t, Precision.FP8_E4M3).numpy(), reference(x.T, Precision.FP8_E4M3)).all()
    for s in (0.37, 3.0e-3, 1.0, 1e-40, 7.0e35, 3.0e37):  # 2**8 * 3e37 overflows: torch's conversion
        out = quantize(t, Precision.FP8_E4M3, torch.tensor(s, dtype=torch.float32)).numpy()
        with np.errstate(over="ignore"):  # x / 1e-40 overflows where the rounding saturates anyway
            ref = reference((x.T / np.float32(s)).astype(np.float32), Precision.FP8_E4M3) * np.float32(s)
        assert out.shape == (61, 24) and same_bits(out, ref.astype(np.float32)).all(), s
    rows = np.logspace(-30, 30, 61).astype(np.float32)[:, None]
    out = quantize(t, Precision.FP8_E4M3, torch.from_numpy(rows)).numpy()
    with np.errstate(over="ignore"):
        ref = reference((x.T / rows).astype(np.float32), Precision.FP8_E4M3) * rows
    assert same_bits(out, ref.astype(np.float32)).all()


def test_per_channel_weight_scale() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 16) * torch.logspace(-3, 3, 8).unsqueeze(1)
    scale = fp8_scale(channel_amax(w))
    assert scale.shape == (8, 1)
    q = quantize(w, Precision.FP8_E4M3, scale)
    rel = ((q - w).abs().amax(dim=1) / w.abs().amax(dim=1))
    assert (rel <= 2**-4 + 1e-6).all()  # half an E4M3 ulp at the top of each channel's range


def test_zero_amax_scale_is_safe() -> None:
    assert fp8_scale(0.0).item() == 1.0
    assert fp8_scale(float("nan")).item() == 1.0
    z = torch.zeros(4)
    assert (quantize(z, Precision.FP8_E4M3, fp8_scale(0.0)) == 0).all()


def test_gradient_is_straight_through() -> None:
    x = torch.randn(32, requires_grad=True)
    quantize(x, Precision.FP8_E4M3, fp8_scale(x.detach().abs().max())).sum().backward()
    assert torch.equal(x.grad, torch.ones(32))


def test_parse_at_the_edge() -> None:
    assert parse_precision("BF16") is Precision.BF16
    assert parse_precision("fp8") is Precision.FP8_E4M3
    assert parse_precision("float8_e5m2") is Precision.FP8_E5M2
    assert parse_precisions("bf16, fp16,bf16") == (Precision.BF16, Precision.FP16)
    with pytest.raises(UsageError, match="unknown format 'fp12'"):
        parse_precision("fp12")
    with pytest.raises(UsageError):
        parse_precisions("")
    assert wider(Precision.FP16, Precision.BF16) is Precision.BF16
    assert Precision.FP8_E4M3.compute_output is Precision.BF16
