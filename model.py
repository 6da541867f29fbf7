"""A hand-written UNet for 3D volumes (or 2D slices): plain arguments in, logits out.

Stage i of the encoder is two 3x3(x3) conv-norm-LeakyReLU layers, the first with stride 2 for
i > 0 (nnU-Net's strided downsampling: it keeps the convolutions large and dense, which is what
lets a step run near the machine's matmul ceiling). The decoder upsamples with transposed
convolutions, concatenates the skip connection and applies another double conv. A 1x1(x1) conv
head returns one logit map per output channel; no sigmoid here.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NORMS = ("instance", "batch", "group")


def make_norm(kind, channels, dims):
    if kind == "instance":
        return InstanceNorm(channels)
    if kind == "batch":
        return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


class InstanceNorm(nn.Module):
    """InstanceNorm(affine=True), same arithmetic and parameter names (weight, bias), computed as
    training-mode batch norm over each sample: that kernel keeps a channels-last (bf16) input in
    its layout, where F.instance_norm reorders it to contiguous and the next convolution reorders it
    back (a third of a bf16 step at 64^3), and GroupNorm(C, C), which keeps it, has a backward 5x
    slower. The statistics are always the sample's own, in training and in evaluation alike."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        norm = [F.batch_norm(s, None, None, self.weight, self.bias, True, 0.0, self.eps) for s in x.split(1)]
        return norm[0] if len(norm) == 1 else torch.cat(norm)


class ConvBlock(nn.Sequential):
    """Two conv-norm-activation layers; the first may downsample with its stride."""

    def __init__(self, in_ch, out_ch, dims, norm, stride=1):
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        super().__init__(
            conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), make_norm(norm, out_ch, dims),
            nn.LeakyReLU(0.01, inplace=True),
            conv(out_ch, out_ch, 3, padding=1, bias=False), make_norm(norm, out_ch, dims),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet(nn.Module):
    def __init__(self, in_channels=4, out_channels=3, *, base_channels=16, depth=3, norm="instance",
                 dims=3, max_channels=320, checkpointing=False):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.dims, self.depth, self.norm, self.checkpointing = dims, depth, norm, checkpointing
        widths = [min(base_channels * 2 ** i, max_channels) for i in range(depth + 1)]
        up = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels, widths[0], dims, norm)]
            + [ConvBlock(widths[i - 1], widths[i], dims, norm, stride=2) for i in range(1, depth + 1)])
        self.upsamplers = nn.ModuleList(
            [up(widths[i + 1], widths[i], 2, stride=2, bias=False) for i in reversed(range(depth))])
        self.decoder = nn.ModuleList(
            [ConvBlock(2 * widths[i], widths[i], dims, norm) for i in reversed(range(depth))])
        self.head = conv(widths[0], out_channels, 1)

    def check_size(self, spatial):
        step = 2 ** self.depth
        bad = [s for s in spatial if s % step]
        if bad:
            fixes = ", ".join(f"{s} -> {s - s % step} or {s + step - s % step}" for s in bad)
            raise ValueError(f"input size {tuple(spatial)} must be divisible by 2**depth = {step} "
                             f"in every spatial axis ({fixes})")
        if self.norm == "instance" and all(s == step for s in spatial):
            raise ValueError(f"input size {tuple(spatial)} leaves a 1-voxel bottleneck, which instance norm "
                             f"cannot normalise; use inputs of at least {2 * step} in one axis or less depth")

    def forward(self, x):
        if x.dim() != self.dims + 2:
            raise ValueError(f"expected a {self.dims + 2}-D batch (N, C, *spatial), got shape {tuple(x.shape)}")
        self.check_size(x.shape[2:])
        skips = []
        for stage in self.encoder:
            x = self.run_stage(stage, x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for upsample, stage in zip(self.upsamplers, self.decoder):
            x = self.run_stage(stage, torch.cat([upsample(x), skips.pop()], dim=1))
        return self.head(x)

    def run_stage(self, stage, x):
        """With gradient checkpointing a stage keeps only its input for the backward pass and
        recomputes its inner activations there: less memory for about one more forward."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)


def build_model(model_cfg):
    """The UNet described by a ModelConfig."""
    return UNet(model_cfg.in_channels, model_cfg.out_channels, base_channels=model_cfg.base_channels,
                depth=model_cfg.depth, norm=model_cfg.norm, dims=model_cfg.dims,
                max_channels=model_cfg.max_channels, checkpointing=model_cfg.checkpointing)
