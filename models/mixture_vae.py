"""VAE whose approximate posterior is a K-component diagonal Gaussian mixture, Bernoulli pixels.

    q(z | x) = sum_k pi_k(x) N(z; mu_k(x), diag sigma_k(x)^2),   pi(x) = softmax(a(x))
    p(z)     = N(0, I)                 (prior: normal)
             = sum_j rho_j N(z; m_j, diag s_j^2), learned (prior: mixture)
    p(x | z) = Bernoulli(sigmoid(dec(z)))

Cost per example: log q(z|x) - log p(z) - log p(x|z) (negative ELBO) with the exact mixture log-density
log q(z|x) (a log-sum-exp over components, no bound on the entropy). Encoder and decoder are the tanh MLPs
of models/vae.py with the same sizes, so the two sit side by side; the encoder's last layer outputs
K logits, K*D locations and K*D pre-scales. With K = 1 and ``prior: normal`` this is exactly ``VAE``.

The posterior is described as ``MixtureSameFamily(Categorical, Independent(Normal, 1))``; how it is
sampled and how the gradient flows is the estimator's business (implicit_mixture, mixture_score, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from models.base import LatentVariableModel, Sampler, expand_samples, logit
from models.sbn import bernoulli_layer
from models.vae import tanh_mlp

PRIORS = ("normal", "mixture")


def diag_normal_mixture(logits: Tensor, loc: Tensor, scale: Tensor) -> MixtureSameFamily:
    """logits ``[..., K]``, loc/scale ``[..., K, D]`` -> a mixture with batch ``[...]`` and event ``[D]``."""
    return MixtureSameFamily(
        Categorical(logits=logits, validate_args=False),
        Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False),
        validate_args=False,  # relaxed / marginalised values are scored too
    )


class MixtureVAE(LatentVariableModel):
    latent_kind = "mixture"

    def __init__(
        self,
        x_dim: int,
        latent_dim: int = 50,
        components: int = 5,
        hidden: Sequence[int] = (200, 200),
        prior: str = "normal",
        prior_components: int = 10,
        train_mean: Tensor | None = None,
        name: str = "mixture_vae",
    ):
        super().__init__()
        if int(latent_dim) < 1:
            raise ValueError(f"model.latent_dim must be >= 1, got {latent_dim}")
        if int(components) < 1:
            raise ValueError(f"model.components must be >= 1, got {components}")
        if prior not in PRIORS:
            raise ValueError(f"model.prior={prior!r}: choose one of {', '.join(PRIORS)}")
        if prior == "mixture" and int(prior_components) < 1:
            raise ValueError(f"model.prior_components must be >= 1, got {prior_components}")
        self.context_dim = x_dim
        self.latent_dim = d = int(latent_dim)
        self.components = k = int(components)
        self.prior_kind = prior
        self.encoder = tanh_mlp([x_dim, *hidden, k + 2 * k * d])
        self.decoder = tanh_mlp([d, *reversed(list(hidden)), x_dim])
        if prior == "mixture":
            kp = int(prior_components)
            self.prior_logits = nn.Parameter(torch.zeros(kp))  # [Kp]
            self.prior_loc = nn.Parameter(torch.randn(kp, d))  # [Kp, D], spread so the components differ
            self.prior_log_scale = nn.Parameter(torch.zeros(kp, d))  # [Kp, D]
        mean = train_mean if train_mean is not None else torch.full((x_dim,), 0.5)
        self.register_buffer("x_mean", mean.detach().float().clone())  # [X]
        with torch.no_grad():
            self.decoder[-1].bias.copy_(logit(self.x_mean))

    def context(self, x: Tensor) -> Tensor:
        return x - self.x_mean  # [B, X]

    def recognition_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def posterior_parameters(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encoder outputs: logits ``[B, K]``, loc and scale ``[B, K, D]``."""
        k, d = self.components, self.latent_dim
        out = self.encoder(self.context(x))  # [B, K + 2 K D]
        logits, loc, pre_scale = out.split([k, k * d, k * d], dim=-1)  # [B, K], [B, K D], [B, K D]
        loc = loc.unflatten(-1, (k, d))  # [B, K, D]
        scale = F.softplus(pre_scale.unflatten(-1, (k, d))) + 1e-4  # [B, K, D], as in models/vae.py
        return logits, loc, scale

    def posterior(self, x: Tensor) -> MixtureSameFamily:
        return diag_normal_mixture(*self.posterior_parameters(x))  # batch [B], event [D]

    def prior(self, like: Tensor) -> Distribution:
        """p(z), event ``[D]``; ``like`` is a sample whose dtype and device it takes."""
        if self.prior_kind == "mixture":
            return diag_normal_mixture(
                self.prior_logits, self.prior_loc, self.prior_log_scale.exp()
            )  # batch []
        zero = like.new_zeros(())
        return Independent(Normal(zero, zero + 1, validate_args=False).expand((self.latent_dim,)), 1)

    def cost(self, x: Tensor, sample: Sampler, n_samples: int = 1) -> Tensor:
        q = self.posterior(x).expand((n_samples, x.shape[0]))  # batch [S, B], event [D]
        z = sample("z", q)  # [S, B, D] (or [K, S, B, D] when an estimator marginalises the index)
        x_rep = expand_samples(x, n_samples).expand(*z.shape[:-1], x.shape[-1])  # [..., S, B, X]
        log_px = bernoulli_layer(self.decoder(z)).log_prob(x_rep)  # [..., S, B]
        return q.log_prob(z) - self.prior(z).log_prob(z) - log_px  # [..., S, B]
