"""Engram: memory and test-time plasticity research on PyTorch Lightning."""
