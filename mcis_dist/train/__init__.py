"""Classifier training: optimiser, learning-rate schedule and the worker loop."""
