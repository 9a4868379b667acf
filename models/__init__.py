"""Models: what is random and what it costs. Nothing here imports an estimator implementation."""

from models.base import LatentVariableModel
from models.sbn import SBN
from models.vae import VAE

__all__ = ["LatentVariableModel", "SBN", "VAE"]
