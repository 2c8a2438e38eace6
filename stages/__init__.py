"""One thin CLI script per DVC stage (`python -m stages.<name>`).

OpenMP threads spin while they wait; when another process wants the cores (DataLoader workers, a second stage,
the tests) a step then runs ~10x slower (training: 1.0 vs 19 img/s measured on 2 busy cores). Passive waiting
avoids that. libgomp reads the setting once, so it is set here, before any stage imports torch.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
