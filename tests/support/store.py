"""Feature-store test constants: a preprocessing record and a weights hash for test sets."""

from __future__ import annotations

PREPROCESSING = {"num_frames": 16, "short_side": 224, "crop": 224, "mean": [0.485, 0.456, 0.406]}
WEIGHTS = "a3" * 32
