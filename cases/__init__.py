"""Cases on disk: the HDF5 layout, geometry, splits by patient, the synthetic set."""
