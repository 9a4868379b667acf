"""SBN for structured output prediction, SP (Gu et al. 2016, MuProp, Sec. 5.1, Table 2).

Predict the lower half ``y`` of a binarized digit (pixels ``X/2 .. X-1``; rows 14-27 of MNIST) from its upper
half ``x_u`` (pixels ``0 .. X/2-1``) through stochastic Bernoulli layers ``h_1 .. h_L``:

    p(h_1 | x_u) = Bernoulli(sigmoid(g_1(x_u - mean))),  p(h_l | h_{l-1}) = Bernoulli(sigmoid(g_l(h_{l-1}))),
    p(y | h_L)   = Bernoulli(sigmoid(g_out(h_L)))

Each map g is linear, or (``nonlinear``) two tanh layers of ``hidden`` units then linear, as in the SBN.
``layers=[200, 200]`` is the paper's "392-200-200-392", ``[200, 200, 200]`` is "392-200-200-200-392".

Cost per example:  f(h) = -log p(y | h_L),  h ~ p(h | x_u)  (no log-density terms: the h are drawn from the
model itself, so the training objective is E_h[-log p(y | h)], m = 1 in the paper's notation). The base
class's ``bound(x, m)`` then is the paper's evaluation objective log (1/m) sum_i p(y | h_i), h_i ~ p(h | x_u),
so ``test/bound_100`` is minus the paper's test NLL of Table 2.

Choices: the input-dependent baseline sees the whole example (input and target), mean-centred, as in the
paper's IDB for this task. ``recognition_parameters()`` are the parameters of the stochastic layers
``g_1 .. g_L`` (the maps that produce the distributions of h, i.e. the part whose gradient must pass through
the discrete samples, like an SBN's encoder); the output map ``g_out`` gets an exact pathwise gradient from
every estimator and is excluded. The output bias starts at the logit of the training mean of the lower half.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from models.base import LatentVariableModel, Sampler, expand_samples, logit
from models.sbn import bernoulli_layer, mlp


class SBNSP(LatentVariableModel):
    latent_kind = "bernoulli"
    bound_name: ClassVar[str] = "cll"  # conditional log-likelihood bound log (1/m) sum_i p(y | h_i)

    def __init__(
        self,
        x_dim: int,
        layers: Sequence[int] = (200, 200),
        nonlinear: bool = False,
        hidden: int = 200,
        train_mean: Tensor | None = None,
        name: str = "sbn_sp",
    ):
        super().__init__()
        if not layers or any(int(d) < 1 for d in layers):
            raise ValueError(f"model.layers must be a non-empty list of positive sizes, got {list(layers)}")
        if x_dim < 2 or x_dim % 2:
            raise ValueError(
                f"structured prediction splits an example in halves: x_dim must be even, got {x_dim}"
            )
        self.layers = [int(d) for d in layers]
        self.name = name
        self.x_dim = int(x_dim)
        self.split = self.x_dim // 2  # x_u = x[..., :split] (upper half), y = x[..., split:] (lower half)
        self.context_dim = self.x_dim  # the IDB sees input and target
        sizes = [self.split, *self.layers]  # x_u, h_1, ..., h_L
        self.hidden_layers = nn.ModuleList(
            mlp(sizes[i], sizes[i + 1], nonlinear, hidden) for i in range(len(self.layers))
        )
        self.output = mlp(self.layers[-1], self.x_dim - self.split, nonlinear, hidden)
        mean = train_mean if train_mean is not None else torch.full((self.x_dim,), 0.5)
        if mean.shape != (self.x_dim,):
            raise ValueError(f"train_mean must have shape ({self.x_dim},), got {tuple(mean.shape)}")
        self.register_buffer("x_mean", mean.detach().float().clone())  # [X] for centring inputs and context
        out = self.output if not nonlinear else self.output[-1]
        with torch.no_grad():
            out.bias.copy_(logit(self.x_mean[self.split :]))  # output bias = logit of the lower half's mean

    def context(self, x: Tensor) -> Tensor:
        return x - self.x_mean  # [B, X]: input and target, mean-centred

    def recognition_parameters(self) -> Iterator[nn.Parameter]:
        return self.hidden_layers.parameters()

    def cost(self, x: Tensor, sample: Sampler, n_samples: int = 1) -> Tensor:
        x_u = x[..., : self.split] - self.x_mean[: self.split]  # [B, X/2] centred upper half
        y = x[..., self.split :]  # [B, X/2] lower half (target)
        h = x_u  # [B, X/2]
        for i, layer in enumerate(self.hidden_layers):  # from the input through the stochastic layers
            logits = layer(h)  # [S, B, D_i] ([B, D_1] for the first layer)
            if i == 0:
                logits = expand_samples(logits, n_samples)  # [S, B, D_1], a view: computed once per example
            h = sample(f"h{i + 1}", bernoulli_layer(logits))  # [S, B, D_i] (or [K, S, B, D_i])
        log_p_y = bernoulli_layer(self.output(h)).log_prob(y.expand(*h.shape[:-1], y.shape[-1]))  # [S, B]
        return -log_p_y  # [S, B]
