"""Pure functions on one case: regions, normalisation, 2.5D context, resampling, augmentation."""
