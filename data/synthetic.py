"""A data source with no data, for models that have none (SVI of a fixed target, models/mixture_svi.py).

Every split holds ``n`` all-zero examples of ``x_dim`` units, so the runner's loop (minibatches, validation
and test passes, the importance-weighted bound) runs unchanged: a model such as ``MixtureSVI`` reads only
the batch size from ``x``, and each "example" of an evaluation pass is one more independent draw of its
bound. Built on data/common.py's ``Dataset`` and ``Split`` (uint8 zeros, "fixed" binarization).
"""

from __future__ import annotations

import torch

from data.common import SPLITS, Dataset, Split


class Synthetic(Dataset):
    """All-zero examples: ``n`` in the training split, ``n_eval`` in "valid" and in "test".

    ``root`` is accepted and ignored, so that one command line (``data.root=...``) fits every data source.
    """

    kind = "none"  # no observations: for models of a fixed target (models/mixture_svi.py)

    def __init__(
        self,
        n: int = 1000,
        x_dim: int = 1,
        n_eval: int | None = None,
        device: str | torch.device = "cpu",
        name: str = "synthetic",
        root: str | None = None,
        download: bool = True,
        verify: bool = True,
    ):  # root, download, verify: accepted and ignored, so the file-dataset overrides work on every preset
        n_eval = n if n_eval is None else n_eval
        if int(n) < 1 or int(n_eval) < 1 or int(x_dim) < 1:
            raise ValueError(f"data.n, data.n_eval and data.x_dim must be >= 1, got {n}, {n_eval}, {x_dim}")
        sizes = {"train": int(n), "valid": int(n_eval), "test": int(n_eval)}
        splits = {
            s: Split(torch.zeros(sizes[s], int(x_dim), dtype=torch.uint8, device=device), "fixed")  # [N, X]
            for s in SPLITS
        }
        super().__init__(name, splits)
