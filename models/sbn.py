"""Sigmoid belief network with an SBN recognition model (Neal 1992; Mnih & Gregor 2014; Gu et al. 2016).

Generative model, stochastic layers ``z_1 .. z_L`` (``z_1`` next to the pixels):

    p(z_L) = Bernoulli(sigmoid(b)),  p(z_{l-1} | z_l) = Bernoulli(sigmoid(g_l(z_l))),  p(x | z_1) = Bernoulli(...)

Recognition model, bottom up: q(z_1 | x), q(z_{l+1} | z_l), all Bernoulli. Each map g is linear
("linear" SBN) or two tanh layers of ``hidden`` units then linear ("nonlinear"). The recognition net sees
mean-centred pixels; the decoder's output bias starts at the logit of the training mean.

Cost per example (negative ELBO):  sum_l log q(z_l | .) - log p(z_L) - sum_l log p(z_{l-1} | z_l) - log p(x | z_1).
``layers=[200]`` is the paper's "SBN 200-784", ``[200, 200]`` is "200-200-784".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent

from models.base import LatentVariableModel, Sampler, expand_samples, logit
from models.members import Linear, rows


def bernoulli_layer(logits: Tensor) -> Independent:
    """A factorised Bernoulli layer; validation off so that mean-field and relaxed values can be scored."""
    return Independent(Bernoulli(logits=logits, validate_args=False), 1)


def mlp(n_in: int, n_out: int, nonlinear: bool, hidden: int) -> nn.Module:
    if not nonlinear:
        return Linear(n_in, n_out)
    return nn.Sequential(
        Linear(n_in, hidden), nn.Tanh(), Linear(hidden, hidden), nn.Tanh(), Linear(hidden, n_out)
    )


class SBN(LatentVariableModel):
    latent_kind = "bernoulli"
    member_dim = True

    def __init__(
        self,
        x_dim: int,
        layers: Sequence[int] = (200,),
        nonlinear: bool = False,
        hidden: int = 200,
        train_mean: Tensor | None = None,
        name: str = "sbn",
    ):
        super().__init__()
        if not layers or any(int(d) < 1 for d in layers):
            raise ValueError(f"model.layers must be a non-empty list of positive sizes, got {list(layers)}")
        self.layers = [int(d) for d in layers]
        self.context_dim = x_dim
        sizes = [x_dim, *self.layers]  # x, z_1, ..., z_L
        self.encoder = nn.ModuleList(
            mlp(sizes[i], sizes[i + 1], nonlinear, hidden) for i in range(len(self.layers))
        )
        self.decoder = nn.ModuleList(
            mlp(sizes[i + 1], sizes[i], nonlinear, hidden) for i in range(len(self.layers))
        )
        self.prior_logits = nn.Parameter(torch.zeros(self.layers[-1]))  # [D_L]
        mean = train_mean if train_mean is not None else torch.full((x_dim,), 0.5)
        self.register_buffer(
            "x_mean", mean.detach().float().clone()
        )  # [X] for centring the recognition input
        out = self.decoder[0] if not nonlinear else self.decoder[0][-1]
        with torch.no_grad():
            out.bias.copy_(logit(self.x_mean))  # decoder output bias = logit of the training mean

    def context(self, x: Tensor) -> Tensor:
        return x - self.x_mean  # [B, X]

    def recognition_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def cost(self, x: Tensor, sample: Sampler, n_samples: int = 1) -> Tensor:
        h = self.context(x)  # [B, X]: the first layer's input is the same for every sample
        log_q = 0.0
        zs = []
        for i, enc in enumerate(self.encoder):  # recognition pass, bottom up
            logits = enc(h)  # [S, B, D_i] ([B, D_1] for the first layer)
            if i == 0:
                logits = expand_samples(logits, n_samples)  # [S, B, D_1], a view: computed once per example
            q = bernoulli_layer(logits)  # [S, B, D_i]
            h = sample(f"z{i + 1}", q)  # [S, B, D_i]
            log_q = log_q + q.log_prob(h)  # [S, B]
            zs.append(h)
        log_p = bernoulli_layer(rows(self.prior_logits, zs[-1], 1)).log_prob(zs[-1])  # [S, B]
        targets = [x, *zs[:-1]]  # what layer i's decoder predicts from z_{i+1}
        for dec, z, target in zip(self.decoder, zs, targets):
            log_p = log_p + bernoulli_layer(dec(z)).log_prob(
                target.expand(*z.shape[:-1], target.shape[-1])
            )  # [S, B]
        return log_q - log_p  # [S, B]

    @torch.no_grad()
    def generate(self, n: int) -> Tensor:
        """Pixel probabilities p(x | z_1) of ``n`` ancestral samples z_L -> ... -> z_1 of the generative model, [n, X]."""
        z = torch.bernoulli(torch.sigmoid(self.prior_logits).expand(n, -1))  # [n, D_L]
        for dec in reversed(self.decoder[1:]):  # decoder[i] maps z_{i+1} to the logits of z_i
            z = torch.bernoulli(torch.sigmoid(dec(z)))  # [n, D_i]
        return torch.sigmoid(self.decoder[0](z))  # [n, X]
