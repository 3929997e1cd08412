import pytest
import torch

from pipeline.errors import CoregError
from pipeline.networks import build_student, count_parameters

ARCH_FEAT = [("preact_resnet18", 512), ("small_cnn", 128), ("timm:test_resnet", 96)]


@pytest.mark.parametrize("arch,feat_dim", ARCH_FEAT)
@pytest.mark.parametrize("size", [32, 64])
def test_student_shapes_and_unit_embedding(arch, feat_dim, size):
    torch.manual_seed(0)
    net = build_student(arch, num_classes=7, image_size=size, proj_dim=16)
    x = torch.randn(3, 3, size, size)  # (B, 3, H, W)
    logits = net(x)
    logits2, z = net(x, with_embedding=True)
    assert net.feat_dim == feat_dim
    assert net.features(x).shape == (3, feat_dim)
    assert logits.shape == (3, 7) and z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    # Same weights, same input, train mode: the BN batch statistics are identical, so the logits agree.
    torch.testing.assert_close(logits, logits2)


def test_preact_resnet18_layer1_stride_follows_image_size():
    # method §4: stride-1 layer1 for 32 px, stride 2 for 64 px, so both end on a 4x4 map before pooling
    for size, stride in [(32, 1), (64, 2)]:
        net = build_student("preact_resnet18", num_classes=10, image_size=size)
        assert net.backbone.layer1[0].conv1.stride == (stride, stride)
        assert net.backbone.conv1.stride == (1, 1)
        assert 11_000_000 < count_parameters(net) < 12_000_000  # ResNet-18 + fc + projector


def test_preact_resnet18_takes_other_sizes():
    net = build_student("preact_resnet18", num_classes=2, image_size=16)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 2)


def test_small_cnn_is_small_and_batch_independent():
    torch.manual_seed(0)
    net = build_student("small_cnn", num_classes=10, image_size=32)
    assert 100_000 < count_parameters(net.backbone) < 300_000
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(4, 3, 32, 32)
    net.train()
    whole = net(x)  # (4, 10)
    halves = torch.cat([net(x[:2]), net(x[2:])])  # what two processes would compute
    torch.testing.assert_close(whole, halves, rtol=0, atol=1e-6)


def test_timm_fixed_size_model_is_rebuilt_for_the_image_size():
    net = build_student("timm:test_vit", num_classes=3, image_size=32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize(
    "arch,size,match",
    [
        ("resnet50", 32, "preact_resnet18, small_cnn, timm:NAME"),
        ("timm:", 32, "unknown"),
        ("timm:no_such_model_xyz", 32, "no model"),
        ("small_cnn", 8, "at least 16"),
        ("preact_resnet18", 15, "at least 16"),
        ("timm:test_vit", 17, "cannot take 17 px"),
    ],
)
def test_bad_arch_or_size_is_a_coreg_error(arch, size, match):
    with pytest.raises(CoregError, match=match):
        build_student(arch, num_classes=3, image_size=size)


def test_pretrained_without_local_weights_is_a_coreg_error():
    # conftest sets HF_HUB_OFFLINE=1, so the weights cannot come from the network
    with pytest.raises(CoregError, match="not available locally"):
        build_student("timm:test_resnet", num_classes=3, image_size=32, pretrained=True)
    with pytest.raises(CoregError, match="only applies to timm"):
        build_student("small_cnn", num_classes=3, image_size=32, pretrained=True)


def test_count_parameters_counts_trainable_only():
    lin = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    assert count_parameters(lin) == 8
    lin.bias.requires_grad_(False)
    assert count_parameters(lin) == 6
