"""One thin CLI script per DVC stage (`python -m stages.<name>`).

OpenMP threads spin while they wait; when another process wants the cores (DataLoader workers, a second stage,
the tests) a step then runs ~10x slower (training: 1.0 vs 19 img/s measured on 2 busy cores). Passive waiting
avoids that. libgomp reads the setting once, so it is set here, before any stage imports torch.

MKL picks its float32 matrix-product code path per call, and the paths round differently: two versions of the
code that compute the same thing (the same renders, losses and gradients, bit for bit, at every single step)
drifted apart by up to 0.11 in a coefficient after 100 fit steps, which changed the albedo model built from the
fits and every metric downstream of it. Conditional numerical reproducibility (MKL_CBWR=AUTO,STRICT) fixes
the path: both versions then gave identical fits, and the fit took as long (13.6-14.4 s either way).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
