"""The standard NTU evaluation protocols, decided from sample names (``specs/ntu_data.md``).

xsub: training performers listed below (NTU60); xview: training cameras 2 and 3;
xsub120: the NTU60 list plus the NTU120 additions; xset120: even setup ids train.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lastkd.ntu.skeleton import SampleName, SampleNameError, parse_sample_name

XSUB60_TRAIN_PERFORMERS = frozenset((1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38))
XSUB120_TRAIN_PERFORMERS = XSUB60_TRAIN_PERFORMERS | frozenset(
    (
        45,
        46,
        47,
        49,
        50,
        52,
        53,
        54,
        55,
        56,
        57,
        58,
        59,
        70,
        74,
        78,
        80,
        81,
        82,
        83,
        84,
        85,
        86,
        89,
        91,
        92,
        93,
        94,
        95,
        97,
        98,
        100,
        103,
    )
)
XVIEW_TRAIN_CAMERAS = frozenset((2, 3))
SPLITS = ("xsub", "xview", "xsub120", "xset120")


def is_train(sample: SampleName, split: str) -> bool:
    """Whether a sample belongs to the training side of ``split`` (else it is validation)."""
    if split == "xsub":
        return sample.performer in XSUB60_TRAIN_PERFORMERS
    if split == "xview":
        return sample.camera in XVIEW_TRAIN_CAMERAS
    if split == "xsub120":
        return sample.performer in XSUB120_TRAIN_PERFORMERS
    if split == "xset120":
        return sample.setup % 2 == 0
    raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def split_indices(names: Sequence[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int64, ascending) of the training and the validation samples of ``split``.

    Every name must be a valid NTU sample name; the first one that is not is named in the error.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    mask = np.zeros(len(names), dtype=bool)
    for i, name in enumerate(names):
        try:
            mask[i] = is_train(parse_sample_name(name), split)
        except SampleNameError as exc:
            raise ValueError(f"cannot apply split {split!r} to sample {i}: {exc}") from None
    return np.flatnonzero(mask).astype(np.int64), np.flatnonzero(~mask).astype(np.int64)
