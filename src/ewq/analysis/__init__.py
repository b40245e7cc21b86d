"""Entropy analysis: pure kernels (entropy.py); block aggregation comes with issue 3."""
