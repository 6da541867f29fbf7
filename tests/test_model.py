import pytest
import torch

from model import UNet


@pytest.mark.parametrize("spatial, depth", [((16, 24, 40), 3), ((8, 8, 16), 3), ((12, 20, 28), 2), ((6, 10, 14), 1)])
@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_output_has_input_size_and_one_channel_per_region(spatial, depth, norm):
    model = UNet(in_channels=4, out_channels=3, base_channels=4, depth=depth, norm=norm)
    out = model(torch.randn(2, 4, *spatial))
    assert out.shape == (2, 3, *spatial)


def test_2d_unet():
    model = UNet(in_channels=3, out_channels=1, base_channels=4, depth=3, dims=2)
    assert model(torch.randn(2, 3, 24, 40)).shape == (2, 1, 24, 40)


@pytest.mark.parametrize("spatial", [(30, 32, 32), (32, 33, 32), (20, 20, 20)])
def test_size_not_divisible_is_a_clear_error(spatial):
    model = UNet(base_channels=4, depth=3)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 8"):
        model(torch.randn(1, 4, *spatial))


def test_width_is_capped_and_logits_are_unbounded():
    model = UNet(base_channels=8, depth=4, max_channels=32)
    widths = [stage[0].out_channels for stage in model.encoder]
    assert widths == [8, 16, 32, 32, 32]
    with torch.no_grad():
        out = model(torch.randn(1, 4, 32, 32, 32) * 10)
    assert out.min() < 0 or out.max() > 1  # logits, not probabilities


def test_one_voxel_bottleneck_with_instance_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="1-voxel bottleneck"):
        UNet(base_channels=4, depth=3)(torch.randn(1, 4, 8, 8, 8))


def test_unknown_norm():
    with pytest.raises(ValueError, match="unknown norm"):
        UNet(norm="layer")


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = UNet(base_channels=4, depth=2)
    saving = UNet(base_channels=4, depth=2, checkpointing=True)
    saving.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 16, 16, 16)
    out_plain, out_saving = plain(x), saving(x)
    torch.testing.assert_close(out_saving, out_plain)
    out_plain.square().mean().backward()
    out_saving.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), saving.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
