"""Datasets for the experiment runner: each a `Dataset` with "train"/"valid"/"test" `Split`s held as one
tensor on the run's device. Built by Hydra from `conf/data/*.yaml`:

- `data.binarized_mnist.BinarizedMNIST`: fixed binarization (Larochelle & Murray), 50k/10k/10k.
- `data.mnist.MNIST(binarize="dynamic" | "threshold")`: grey MNIST binarized per use or by threshold.

Loading problems raise `DataError`, whose message says what is missing or wrong and how to fix it.
"""

from data.common import DataError, Dataset, Split

__all__ = ["DataError", "Dataset", "Split"]
