import pytest
import torch

from fastperc.models import UNet


def test_default_unet_is_small_and_maps_32x32_to_32x32():
    model = UNet()
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n <= 3e6 and model.in_channels == 1
    x = torch.randn(2, 1, 32, 32)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_null_class_is_used_when_labels_are_missing():
    torch.manual_seed(0)
    model = UNet(num_classes=10).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 5])
    null = torch.full((2,), model.null_class)
    assert torch.equal(model(x, t), model(x, t, class_labels=null))
    assert not torch.allclose(model(x, t), model(x, t, class_labels=torch.tensor([1, 2])))


def test_scalar_timestep_is_broadcast():
    model = UNet().eval()
    x = torch.randn(3, 1, 32, 32)
    assert torch.allclose(model(x, 7), model(x, torch.tensor([7, 7, 7])))


def test_unet_rejects_wrong_input_shape_and_labels_on_unconditional_model():
    model = UNet()
    with pytest.raises(ValueError, match="sample"):
        model(torch.randn(2, 3, 32, 32), 1)
    with pytest.raises(ValueError, match="sample"):
        model(torch.randn(2, 1, 30, 30), 1)
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(2, 1, 32, 32), 1, class_labels=torch.tensor([0, 1]))
