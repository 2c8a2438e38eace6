"""Weakly-supervised 3DMM face reconstruction (Deng et al. 2019) as an importable library.

One subpackage per concern; see docs/conventions.md for spaces, units and shapes.

Importing any part of the library first fixes two process settings (unless the caller has set them), so that a
stage, a test and a user's own script compute the same numbers at the same speed:
- OpenMP threads spin while they wait; when another process wants the cores (DataLoader workers, a second stage,
  the tests) a step then runs ~10x slower (training: 1.0 vs 19 img/s measured on 2 busy cores). Passive waiting
  avoids that. libgomp reads the setting once, when torch loads it, so it is set before any subpackage imports
  torch.
- MKL picks its float32 matrix-product code path per call, and the paths round differently: two versions of the
  code that compute the same thing (the same renders, losses and gradients, bit for bit, at every single step)
  drifted apart by up to 0.11 in a coefficient after 100 fit steps, which changed the albedo model built from the
  fits and every metric downstream of it. Conditional numerical reproducibility (MKL_CBWR=AUTO,STRICT) fixes the
  path: both versions then gave identical fits, and the fit took as long (13.6-14.4 s either way). MKL reads it at
  its first call, so it holds even after torch is imported. It used to be set by the stages alone: a fit run
  from the library without them (a single test, a script) then followed the other path and scored the annotated
  photos up to 0.36 points of inner NME apart from the same fit in the full test suite.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
