"""Variational autoencoder with Gaussian latents and Bernoulli pixels (Kingma & Welling 2014).

    q(z | x) = N(mu(x), diag sigma(x)^2),  p(z) = N(0, I),  p(x | z) = Bernoulli(sigmoid(dec(z)))

Encoder and decoder are tanh MLPs. Cost per example: log q(z|x) - log p(z) - log p(x|z) (negative ELBO).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from models.base import LatentVariableModel, Sampler, expand_samples, logit
from models.sbn import bernoulli_layer


def tanh_mlp(sizes: Sequence[int]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


class VAE(LatentVariableModel):
    latent_kind = "normal"

    def __init__(
        self,
        x_dim: int,
        latent_dim: int = 50,
        hidden: Sequence[int] = (200, 200),
        train_mean: Tensor | None = None,
        name: str = "vae",
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"model.latent_dim must be >= 1, got {latent_dim}")
        self.context_dim = x_dim
        self.latent_dim = latent_dim
        self.encoder = tanh_mlp([x_dim, *hidden, 2 * latent_dim])
        self.decoder = tanh_mlp([latent_dim, *reversed(list(hidden)), x_dim])
        mean = train_mean if train_mean is not None else torch.full((x_dim,), 0.5)
        self.register_buffer("x_mean", mean.detach().float().clone())  # [X]
        with torch.no_grad():
            self.decoder[-1].bias.copy_(logit(self.x_mean))

    def context(self, x: Tensor) -> Tensor:
        return x - self.x_mean  # [B, X]

    def recognition_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def posterior(self, x: Tensor) -> Independent:
        loc, pre_scale = self.encoder(self.context(x)).chunk(2, dim=-1)  # [B, D] each
        return Independent(Normal(loc, F.softplus(pre_scale) + 1e-4, validate_args=False), 1)

    def cost(self, x: Tensor, sample: Sampler, n_samples: int = 1) -> Tensor:
        q = self.posterior(x).expand((n_samples, x.shape[0]))  # batch [S, B], event [D]
        z = sample("z", q)  # [S, B, D] (or with more leading dims)
        prior = Independent(Normal(torch.zeros_like(z), torch.ones_like(z)), 1)
        log_px = bernoulli_layer(self.decoder(z)).log_prob(
            expand_samples(x, n_samples).expand(*z.shape[:-1], x.shape[-1])
        )
        return q.log_prob(z) - prior.log_prob(z) - log_px  # [S, B]

    @torch.no_grad()
    def generate(self, n: int) -> Tensor:
        """Pixel probabilities p(x | z) of ``n`` draws z ~ p(z) = N(0, I), [n, X]."""
        z = torch.randn(n, self.latent_dim, device=self.x_mean.device)  # [n, D]
        return torch.sigmoid(self.decoder(z))  # [n, X]
