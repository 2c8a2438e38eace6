"""Weakly-supervised 3DMM face reconstruction (Deng et al. 2019) as an importable library.

One subpackage per concern; see docs/conventions.md for spaces, units and shapes.
"""
