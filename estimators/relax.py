"""RELAX for Bernoulli units: REBAR with a learned neural term in the control variate.

    g_l = [f(b) - c(z_t)] d log p(b) / dl  +  d c(z) / dl  -  d c(z_t) / dl,
    c(z) = eta (f(sigmoid(z / tau)) + r_rho(z))

Grathwohl, Choi, Wu, Roeder, Duvenaud, "Backpropagation through the Void: Optimizing control variates for
black-box gradient estimation", ICLR 2018: the discrete RELAX estimator, its section "Discrete variational
autoencoder" (c_phi(z) = f(sigma_lambda(z)) + r_rho(z), r_rho a neural network) and phi = (tau, eta, rho) trained
on the single-sample variance estimate (section "Gradient-based optimization of the control variate"). **Unbiased** for every phi: c is any differentiable function of z given the layers below.

Everything but c is REBAR's (estimators/rebar.py: tied conditional noise, per-layer form for multi-layer SBNs,
the variance objective in logit space and how its gradient reaches phi through the surrogate). The reference
code (duvenaud/relax ``binary_vae_multilayer_per_layer.py``, ``Q_func`` with ``relaxation="add"``) feeds the
net of layer i with [x - mean(x), z_i, 2 b_<i - 1] and multiplies f + r by eta; so does this module, with
one net per layer. The task asks for one hidden layer (the reference searched 2 and 4 ReLU layers of 200);
``hidden`` sets its width. The output layer starts at zero, so RELAX starts as REBAR. Weight decay on the
nets (the reference's ``Q_wd``, an L2 term 0.5 wd |w|^2 added to the variance objective, before the preconditioning) is ``weight_decay``.

The nets must exist before the first forward (so that the runner's optimiser and checkpoint see them) but
the input width, C + D_i + sum_{j<i} D_j, is known only when the model runs. Each first layer is therefore
allocated for ``max_input`` features and applied to the first n columns of its weight: exactly a linear layer
on the input zero-padded to ``max_input`` (the unused columns get zero gradient). A wider input raises
``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from estimators.rebar import REBAR


class PaddedNet(nn.Module):
    """r(x) = w2^T relu(W1 [x; 0] + b1) + b2 for inputs of up to ``max_input`` features: [..., n] -> [...]."""

    def __init__(self, max_input: int, hidden: int):
        super().__init__()
        self.first = nn.Linear(max_input, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)  # r = 0 at the start: RELAX starts as REBAR
        nn.init.zeros_(self.out.bias)

    def forward(self, inp: Tensor) -> Tensor:
        n = inp.shape[-1]
        if n > self.first.in_features:
            raise ValueError(
                f"RELAX control-variate input has {n} features but the net holds {self.first.in_features}; "
                f"set estimator.max_input >= {n}"
            )
        # the first n columns only: the same as zero-padding the input to max_input features
        h = F.relu(F.linear(inp, self.first.weight[:, :n], self.first.bias))  # [..., H]
        return self.out(h).squeeze(-1)  # [...]


class RELAX(REBAR):
    def __init__(
        self,
        n_samples: int = 1,
        temperature: float = 0.5,
        eta: float = 1.0,
        max_layers: int = 4,
        hidden: int = 200,
        max_input: int = 1400,
        weight_decay: float = 0.001,
        rms_decay: float = 0.99,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(
            n_samples=n_samples,
            temperature=temperature,
            eta=eta,
            max_layers=max_layers,
            rms_decay=rms_decay,
            context_dim=context_dim,
            name=name,
        )
        if int(hidden) < 1 or int(max_input) < 1 or weight_decay < 0:
            raise ValueError(
                f"estimator.hidden and estimator.max_input must be >= 1 and weight_decay >= 0, got "
                f"{hidden}, {max_input}, {weight_decay}"
            )
        self.weight_decay = float(weight_decay)
        self.nets = nn.ModuleList(PaddedNet(int(max_input), int(hidden)) for _ in range(self.max_layers))
        self.register_rms_buffers()  # the nets' running means of the squared variance gradient

    def control_variate(
        self, layer: int, f_relaxed: Tensor, z: Tensor, hard_below: list[Tensor], context: Tensor | None
    ) -> Tensor:
        """c_i = eta_i (f(s(z_i)) + r_i([x - mean, z_i, 2 b_<i - 1])), [S, B]."""
        parts = []
        if context is not None:
            parts.append(context.to(z.dtype).expand(*z.shape[:-1], context.shape[-1]))  # [S, B, C]
        parts.append(z)  # [S, B, D_i], logit-space relaxed sample (the leaf)
        parts.extend(
            2 * b - 1 for b in hard_below
        )  # [S, B, D_j], j < i: the hard layers it is conditioned on
        r = self.nets[layer](torch.cat(parts, -1))  # [S, B]
        return self.eta[layer] * (f_relaxed + r)  # [S, B]

    def control_variate_penalty(self, n_layers: int) -> Tensor | float:
        """0.5 * wd * |w|^2 over the parameters of the nets in use (tf.nn.l2_loss over the Q variables, as the
        reference); the nets of layers the model lacks get no gradient at all and stay as they are."""
        if self.weight_decay == 0:
            return 0.0
        return 0.5 * self.weight_decay * sum(p.square().sum() for p in self.nets[:n_layers].parameters())
