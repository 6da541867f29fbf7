"""Whole-case prediction at the case's native grid.

`predict_case` takes a raw image (C, *spatial) as stored and returns region probabilities
(R, *spatial) on the same grid, so scores and exported label maps are always at native resolution.
"""
import torch

from transforms import resize_image, zscore_brain


@torch.no_grad()
def predict_case(model, image, cfg, device, amp_dtype=None):
    """Resize mode: normalise, resize to data.image_size, predict, resize probabilities back."""
    model.eval()
    native = tuple(image.shape[1:])
    x = resize_image(zscore_brain(image), tuple(cfg.data.image_size))[None].to(device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(x)
    probs = torch.sigmoid(logits.float())[0].cpu()
    return resize_image(probs, native).clamp_(0, 1)
