"""Co-pseudo-labeling and mixup (coreg-method.md §3.3, §3.4): exact values on hand-built tensors."""

from types import SimpleNamespace

import pytest
import torch
from scipy.stats import beta

from pipeline.coreg.mixup import mixup, sample_lambda
from pipeline.coreg.pseudo_labels import labeled_targets, sharpen, unlabeled_targets


def test_sharpen_t_half_squares_and_renormalises():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]])
    expected = torch.tensor([[25.0, 9.0, 4.0], [1.0, 1.0, 4.0]])
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(sharpen(p, T=0.5), expected)
    torch.testing.assert_close(sharpen(p, T=1.0), p)


def test_labeled_targets_co_fuses_partner_masked_and_self_mean():
    partner = torch.tensor([[0.0, 0.8, 0.2], [1.0, 0.0, 0.0]])
    self_mean = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.6, 0.2]])
    w = torch.tensor([0.75, 0.5])
    fused = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])  # w·p_A + (1−w)·p̄_B by hand
    out = labeled_targets(partner, w, self_mean, T=0.5)
    torch.testing.assert_close(out, sharpen(fused, T=0.5))
    # w/o Co-PL: own masked score instead of the partner's
    own = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    fused_own = torch.tensor([[0.475, 0.475, 0.05], [0.1, 0.3, 0.6]])
    out = labeled_targets(partner, w, self_mean, T=0.5, co=False, self_masked=own)
    torch.testing.assert_close(out, sharpen(fused_own, T=0.5))
    with pytest.raises(ValueError):
        labeled_targets(partner, w, self_mean, T=0.5, co=False)


def test_labeled_targets_trusted_rows_are_exactly_one_hot():
    one_hot = torch.tensor([[0.0, 0.0, 1.0]])
    self_mean = torch.tensor([[0.7, 0.2, 0.1]])
    out = labeled_targets(one_hot, torch.ones(1), self_mean, T=0.5)
    assert torch.equal(out, one_hot)


def test_unlabeled_targets():
    a = torch.tensor([[0.6, 0.4, 0.0]])
    b = torch.tensor([[0.2, 0.4, 0.4]])
    torch.testing.assert_close(
        unlabeled_targets(a, b, T=0.5), sharpen(torch.tensor([[0.4, 0.4, 0.2]]), T=0.5)
    )
    torch.testing.assert_close(unlabeled_targets(a, b, T=0.5, co=False), sharpen(a, T=0.5))


def test_mixup_exact():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    perm = torch.tensor([2, 0, 1])
    x_mix, t_mix = mixup(x, t, lam=0.75, perm=perm)
    torch.testing.assert_close(x_mix, torch.tensor([[2.0, 3.0], [2.5, 3.5], [4.5, 5.5]]))
    torch.testing.assert_close(t_mix, torch.tensor([[0.875, 0.125], [0.25, 0.75], [0.375, 0.625]]))


def test_sample_lambda_is_folded_inverse_cdf_of_one_uniform():
    g = torch.Generator().manual_seed(123)
    u = torch.rand((), generator=torch.Generator().manual_seed(123), dtype=torch.float64).item()
    lam = sample_lambda(4.0, g)
    assert 0.5 <= lam <= 1.0
    # λ is Beta(4,4)'s quantile of u, folded: its CDF value is u or 1 − u
    assert min(abs(beta.cdf(lam, 4, 4) - u), abs(beta.cdf(1 - lam, 4, 4) - u)) < 1e-9


def test_sample_lambda_deterministic_given_generator():
    draws = [sample_lambda(4.0, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    g = torch.Generator().manual_seed(5)
    first, second = sample_lambda(4.0, g), sample_lambda(4.0, g)  # the generator advances
    assert first != second
    with pytest.raises(ValueError):
        sample_lambda(0.0, g)


def test_sample_lambda_refuses_a_device_generator():
    """λ is a host number: drawn on a device it would be read back at every step (a host-device sync)."""
    with pytest.raises(ValueError, match="CPU generator"):
        sample_lambda(4.0, SimpleNamespace(device=torch.device("cuda")))
