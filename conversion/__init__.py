"""Users' layouts (Kaggle slices, LGG TIFFs, generic .h5, BraTS NIfTI) to the project's .h5."""
