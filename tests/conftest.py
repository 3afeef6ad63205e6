import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker gets one intra-op thread: with two workers on two cores, more
    # threads than cores make OpenMP spin-wait, and the fast tier runs 3x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
