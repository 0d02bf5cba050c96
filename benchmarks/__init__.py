"""Benchmarks of qreg's training step (python -m benchmarks.<name>)."""
