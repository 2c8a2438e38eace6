"""Differentiable rendering: the batched rasterizer and mesh export."""
from .rasterize import Fragments, Rendered, interpolate, rasterize, render

__all__ = ["Fragments", "Rendered", "interpolate", "rasterize", "render"]
