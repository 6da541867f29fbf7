import torch

from losses import DiceBCELoss, soft_dice_loss


def test_perfect_prediction_has_loss_near_zero():
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    logits = (target * 2 - 1) * 50
    assert DiceBCELoss()(logits, target).item() < 1e-4


def test_wrong_prediction_is_penalised():
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    logits = (1 - 2 * target) * 50
    assert DiceBCELoss()(logits, target).item() > 1.0


def test_empty_masks_give_a_finite_loss_and_gradient():
    target = torch.zeros(1, 3, 8, 8, 8)
    logits = torch.zeros(1, 3, 8, 8, 8, requires_grad=True)
    loss = DiceBCELoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert soft_dice_loss(torch.full((1, 3, 4, 4, 4), -50.0), torch.zeros(1, 3, 4, 4, 4)).item() < 1e-3


def test_weights_scale_the_terms():
    target = (torch.rand(1, 3, 8, 8, 8) > 0.5).float()
    logits = torch.randn(1, 3, 8, 8, 8)
    dice_only = DiceBCELoss(1.0, 0.0)(logits, target)
    bce_only = DiceBCELoss(0.0, 1.0)(logits, target)
    assert torch.allclose(DiceBCELoss(2.0, 3.0)(logits, target), 2 * dice_only + 3 * bce_only)
