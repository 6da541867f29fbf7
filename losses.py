"""Soft Dice on sigmoid probabilities plus BCE-with-logits, for multi-label region maps."""
import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits, target, smooth=1e-5, batch_dice=False):
    """1 - soft Dice per channel, averaged over channels (and samples).

    Per sample (batch_dice=False): a channel empty in both target and prediction scores Dice ~1
    (loss ~0) thanks to the smoothing term, but a sample whose target channel is empty scores
    ~0 as soon as it predicts anything, with almost no gradient: its false positives are left to BCE.
    Batch Dice (batch_dice=True, nnU-Net's choice for region-based BraTS) sums intersection and
    denominators over the batch as well as space, per channel, so the false positives of an
    empty-target sample enlarge the denominator of a Dice that the other samples keep informative.
    """
    probs = torch.sigmoid(logits.float())
    dims = (0, *range(2, logits.dim())) if batch_dice else tuple(range(2, logits.dim()))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1 - dice.mean()


class DiceBCELoss(nn.Module):
    def __init__(self, dice_weight=1.0, bce_weight=1.0, batch_dice=False):
        super().__init__()
        self.dice_weight, self.bce_weight, self.batch_dice = dice_weight, bce_weight, batch_dice

    def forward(self, logits, target):
        bce = F.binary_cross_entropy_with_logits(logits.float(), target)
        dice = soft_dice_loss(logits, target, batch_dice=self.batch_dice)
        return self.dice_weight * dice + self.bce_weight * bce
