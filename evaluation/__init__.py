"""Prediction, postprocessing, metrics, exports and reports of trained models."""
