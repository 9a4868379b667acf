"""DisARM: ARM with the antithetic uniform integrated out (Rao-Blackwellised ARM) for Bernoulli logits phi.

    d/dphi E[f(z)] = E[ 1/2 (f(b1) - f(b2)) 1[b1 != b2] (-1)^{b2} sigmoid(|phi|) ],
    b1 = 1[u > sigmoid(-phi)],  b2 = 1[u < sigmoid(phi)],  u ~ U(0, 1)^D

Dong, Mnih, Tucker, "DisARM: An Antithetic Gradient Estimator for Binary Latent Variables", NeurIPS 2020
(the DisARM estimator: per unit d the weight uses b1_d, b2_d, phi_d; multi-layer: the per-layer scheme
of ``estimators/arm.py``, base trajectory plus one flipped pass per layer with common random numbers above
it). **Unbiased**: the weight is E[(u_d - 1/2) | b1, b2] and the continuation noise is independent of u_i.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.arm import ARM


class DisARM(ARM):
    def layer_gradient(
        self, f_flip: Tensor, f_base: Tensor, u: Tensor, logits: Tensor, b_flip: Tensor, b_base: Tensor
    ) -> Tensor:
        """DisARM: estimate of d E[f] / d phi for one layer, [S, B, D] (b_flip = b1, b_base = b2)."""
        differs = (b_flip != b_base).to(logits.dtype)  # [S, B, D]
        sign = 1.0 - 2.0 * b_base  # [S, B, D] = (-1)^{b2}
        return (
            0.5 * (f_flip - f_base).unsqueeze(-1) * differs * sign * torch.sigmoid(logits.abs())
        )  # [S, B, D]
