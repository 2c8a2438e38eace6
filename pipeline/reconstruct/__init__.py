"""Reconstruction: batched fitting, network inference, the albedo model, per-face exports and the report."""
