"""Soft Dice on sigmoid probabilities plus BCE-with-logits, for multi-label region maps."""
import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits, target, smooth=1e-5):
    """1 - soft Dice per sample and channel, averaged. A channel empty in both target and
    prediction scores Dice ~1 (loss ~0) thanks to the smoothing term."""
    probs = torch.sigmoid(logits.float())
    dims = tuple(range(2, logits.dim()))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1 - dice.mean()


class DiceBCELoss(nn.Module):
    def __init__(self, dice_weight=1.0, bce_weight=1.0):
        super().__init__()
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits, target):
        bce = F.binary_cross_entropy_with_logits(logits.float(), target)
        return self.dice_weight * soft_dice_loss(logits, target) + self.bce_weight * bce
