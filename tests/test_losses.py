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


def batch_with_an_empty_sample(fp_logit=3.0):
    """Sample 0 has tumour in every channel and predicts it; sample 1 has none but predicts a
    block of false positives at logit `fp_logit` (the rest at -10)."""
    target = torch.zeros(2, 3, 8, 8, 8)
    target[0, :, 2:6, 2:6, 2:6] = 1
    logits = torch.full((2, 3, 8, 8, 8), -10.0)
    logits[0] = target[0] * 20 - 10
    logits[1, :, :2, :2, :2] = fp_logit
    return logits.requires_grad_(), target


def false_positive_gradient(batch_dice):
    logits, target = batch_with_an_empty_sample()
    soft_dice_loss(logits, target, batch_dice=batch_dice).backward()
    return logits.grad[1, :, :2, :2, :2].abs().max().item()


def test_batch_dice_gives_false_positives_of_an_empty_sample_a_gradient():
    # per sample, an empty-target sample at logits -10 scores ~1 whatever it predicts (flat loss)
    flat = torch.full((1, 3, 8, 8, 8), -10.0, requires_grad=True)
    loss = soft_dice_loss(flat, torch.zeros(1, 3, 8, 8, 8))
    loss.backward()
    assert loss.item() > 0.99 and flat.grad.abs().max().item() < 1e-6
    per_sample, batch = false_positive_gradient(False), false_positive_gradient(True)
    assert per_sample < 1e-6
    assert batch > 2e-5 and batch > 1000 * per_sample


def test_batch_dice_of_a_perfect_prediction_is_near_zero():
    target = (torch.rand(3, 3, 8, 8, 8) > 0.5).float()
    target[1, 2] = 0  # one sample with an empty channel
    logits = (target * 2 - 1) * 50
    assert DiceBCELoss(batch_dice=True)(logits, target).item() < 1e-4
    assert soft_dice_loss(logits, target, batch_dice=True).item() < 1e-4


def test_batch_dice_pools_voxels_over_the_batch():
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 3, 6, 6, 6, generator=gen), (torch.rand(2, 3, 6, 6, 6, generator=gen) > 0.7).float()
    # batch Dice of (N, C, ...) equals per-sample Dice of the batch laid side by side as one sample
    side_by_side = lambda x: torch.cat(list(x), dim=-1)[None]  # noqa: E731
    assert torch.allclose(soft_dice_loss(logits, target, batch_dice=True),
                          soft_dice_loss(side_by_side(logits), side_by_side(target)))
    assert not torch.allclose(soft_dice_loss(logits, target, batch_dice=True), soft_dice_loss(logits, target))


def test_default_is_per_sample_dice_as_before():
    gen = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 3, 6, 6, 6, generator=gen), (torch.rand(2, 3, 6, 6, 6, generator=gen) > 0.7).float()
    probs = torch.sigmoid(logits)
    dice = (2 * (probs * target).sum((2, 3, 4)) + 1e-5) / (probs.sum((2, 3, 4)) + target.sum((2, 3, 4)) + 1e-5)
    expected = 1 - dice.mean() + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(DiceBCELoss()(logits, target), expected)
    assert torch.allclose(DiceBCELoss(1.0, 1.0)(logits, target), expected)
