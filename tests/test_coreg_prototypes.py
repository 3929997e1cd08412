"""Prototype EMA (coreg-method.md §3.5, §6.10): the vectorised update equals the sequential per-sample loop."""

import torch
import torch.nn.functional as F

from pipeline.coreg.prototypes import Prototypes


def sequential_reference(protos, z, labels, gamma):
    """The code's update, literally: one sample at a time, then normalise every row (float64)."""
    o = protos.double().clone()
    for zi, c in zip(z.double(), labels.tolist(), strict=True):
        o[c] = gamma * o[c] + (1 - gamma) * zi
    norm = o.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, o / norm.clamp_min(1e-30), o)


def test_update_equals_sequential_loop_from_zeros_and_after():
    g = torch.Generator().manual_seed(0)
    protos = Prototypes(4, 3)
    # class 3 never appears: its zero row must stay zero; class 1 appears 4 times, in interleaved order
    labels = torch.tensor([1, 0, 1, 2, 1, 0, 1])
    z = F.normalize(torch.randn(7, 3, generator=g), dim=1)
    expected = sequential_reference(protos.prototypes, z, labels, 0.9)
    protos.update(z, labels, momentum=0.9)
    torch.testing.assert_close(protos.prototypes, expected.float(), rtol=1e-6, atol=1e-7)
    assert torch.equal(protos.prototypes[3], torch.zeros(3))
    # second batch starts from the normalised prototypes
    labels2 = torch.tensor([3, 3, 0, 2, 2, 2])
    z2 = F.normalize(torch.randn(6, 3, generator=g), dim=1)
    expected2 = sequential_reference(protos.prototypes, z2, labels2, 0.9)
    protos.update(z2, labels2, momentum=0.9)
    torch.testing.assert_close(protos.prototypes, expected2.float(), rtol=1e-6, atol=1e-7)


def test_update_default_momentum_hand_value():
    protos = Prototypes(2, 2)
    protos.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    protos.update(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))  # γ = 0.999
    g = 0.999
    raw = torch.tensor([g * g, (1 - g) * g + (1 - g)], dtype=torch.float64)  # two sequential steps
    torch.testing.assert_close(protos.prototypes[0], (raw / raw.norm()).float())
    torch.testing.assert_close(protos.prototypes[1], torch.tensor([0.0, 1.0]))  # absent: unchanged


def test_update_is_not_differentiable_and_casts():
    protos = Prototypes(2, 2)
    z = torch.tensor([[3.0, 4.0]], requires_grad=True)
    protos.update(z.to(torch.bfloat16), torch.tensor([1]))
    assert protos.prototypes.dtype == torch.float32 and not protos.prototypes.requires_grad
    torch.testing.assert_close(protos.prototypes[1], torch.tensor([0.6, 0.8]))
    assert "prototypes" in protos.state_dict()
