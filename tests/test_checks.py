"""The checks must fail when they should: NaN, wrong values, unwritten outputs."""

import numpy as np
import pytest
import torch

from common.checks import (assert_close, assert_error_within, poison, poisoned, rel_error)


def test_assert_close_passes_within_tolerance_and_fails_outside():
    x = torch.randn(50, 7)
    assert_close(x + 1e-7, x)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close(x + 1e-2 * x.abs().max(), x)


def test_nan_never_passes_and_unwritten_output_is_caught():
    out = poisoned((4, 5), torch.float32)
    ref = torch.randn(4, 5)
    out[:, :4] = ref[:, :4]  # a kernel that forgot the last column
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(out, ref, atol=1.0, rtol=1.0)
    a = poison(np.random.default_rng(0).standard_normal(3))
    assert np.isnan(a).all()


def test_infinities_must_match():
    ref = torch.tensor([1.0, float("inf")])
    assert_close(torch.tensor([1.0, float("inf")]), ref)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, 3.0]), ref)


def test_dtype_tolerances_scale_with_precision():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1000, generator=g)
    # noise far above float32's tolerance, well inside bf16's (|noise| <= ~7e-3 < 1.6e-2)
    noisy = x + 2e-3 * torch.randn(1000, generator=g)
    with pytest.raises(AssertionError):
        assert_close(noisy, x)                         # float32 tolerance
    assert_close(noisy.bfloat16(), x)                  # bf16 tolerance accepts it


def test_error_within_rule():
    ref = torch.randn(100, dtype=torch.float64)
    baseline = ref + 1e-3 * torch.randn(100, dtype=torch.float64)
    assert_error_within(ref + 1e-4, baseline, ref)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_error_within(ref + 1.0, baseline, ref)
    assert rel_error(ref, ref) == 0.0
