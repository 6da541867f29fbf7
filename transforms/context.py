"""2.5D input: a slice stacked with its neighbours as extra channels."""


def context_indices(depth, z, context):
    """Indices of slice z and `context` neighbours on each side, z - context .. z + context, clamped
    to [0, depth - 1]: at the volume's edges the edge slice repeats (there is nothing beyond it)."""
    return [min(max(z + offset, 0), depth - 1) for offset in range(-context, context + 1)]


def slice_with_context(volume, z, context):
    """Slice z of a volume (C, D, H, W) with its neighbours as extra channels (2.5D input):
    ((2 * context + 1) * C, H, W), ordered slice z - context .. z + context, each with its C
    channels (channel j * C + c is channel c of slice z - context + j); edges repeat the edge slice."""
    picked = volume[:, context_indices(volume.shape[1], z, context)]  # (C, 2k + 1, H, W)
    return picked.transpose(0, 1).reshape(-1, *volume.shape[2:])
