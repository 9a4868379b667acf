"""Categorical latent-variable model "(200x10)-784" of MuProp's Table 3 (Gu et al. 2016, Sec. 5.2).

V = ``variables`` (200) categorical latent variables of K = ``classes`` (10) classes each, one-hot valued:

    p(z)     = prod_v Categorical(z_v; softmax(a_v))                (learned prior logits a [V, K]; or uniform)
    p(x | z) = Bernoulli(sigmoid(W flat(z) + c))                     (one linear map of the V*K one-hot units)
    q(z | x) = prod_v Categorical(z_v; softmax(U_v (x - mean) + d_v))  (one linear map, like the SBN 200-784)

Cost per example (negative ELBO): log q(z | x) - log p(z) - log p(x | z). Each of p(z) and q(z | x) is one
``Independent(OneHotCategorical(logits [.., V, K]), 1)`` site (values [S, B, V, K]).

Assumptions (the MuProp paper names the model and the dataset only):
* the maps are linear, as in the paper's linear SBN rows of the same table ("(200x10)-784" is the categorical
  counterpart of "SBN 200-784"); ``nonlinear: true`` puts two tanh layers of ``hidden`` units in each map;
* the prior is learned (``prior: learned``, per-variable logits, starting uniform), as the SBN's prior biases
  are; ``prior: uniform`` fixes it at 1/K (Jang et al. 2017's categorical VAE);
* the recognition net sees mean-centred pixels and the decoder's output bias starts at the logit of the
  training mean, as for the SBN.

``log_prob`` of the sites is the linear form sum_k z_k log p_k: equal to log p(z) at one-hot values, and
defined and linear in z at the class probabilities (MuProp's mean-field point) and at relaxed values
(Gumbel-Softmax), as a Bernoulli's z log p + (1 - z) log(1 - p) is (PyTorch's own ``OneHotCategorical``
returns the log-probability of the argmax class there, flat in z).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributions import Independent, OneHotCategorical

from models.base import LatentVariableModel, Sampler, expand_samples, logit
from models.sbn import bernoulli_layer, mlp

PRIORS = ("learned", "uniform")


class LinearOneHotCategorical(OneHotCategorical):
    """``OneHotCategorical`` whose ``log_prob(z) = sum_k z_k log p_k``: the exact log-mass at one-hot values,
    extended linearly to the simplex (mean-field and relaxed values)."""

    def log_prob(self, value: Tensor) -> Tensor:
        return (value * self.logits).sum(-1)  # [..., V]; self.logits are normalised log-probabilities


def categorical_layer(logits: Tensor) -> Independent:
    """V independent one-hot categorical variables, [.., V, K] logits -> one site with log_prob [..]."""
    return Independent(LinearOneHotCategorical(logits=logits, validate_args=False), 1)


class SBNCategorical(LatentVariableModel):
    latent_kind = "categorical"

    def __init__(
        self,
        x_dim: int,
        variables: int = 200,
        classes: int = 10,
        prior: str = "learned",
        nonlinear: bool = False,
        hidden: int = 200,
        train_mean: Tensor | None = None,
        name: str = "sbn_categorical",
    ):
        super().__init__()
        if int(variables) < 1 or int(classes) < 2:
            raise ValueError(
                f"need variables >= 1 and classes >= 2; got variables={variables}, classes={classes}"
            )
        if prior not in PRIORS:
            raise ValueError(f"model.prior must be one of {', '.join(PRIORS)}; got {prior!r}")
        self.variables, self.classes = int(variables), int(classes)
        self.layers = [self.variables]  # one stochastic layer (runners and tests read the sizes here)
        self.context_dim = x_dim
        units = self.variables * self.classes
        self.encoder = mlp(x_dim, units, nonlinear, hidden)
        self.decoder = mlp(units, x_dim, nonlinear, hidden)
        a = torch.zeros(self.variables, self.classes)  # [V, K]: starts uniform
        if prior == "learned":
            self.prior_logits = nn.Parameter(a)
        else:
            self.register_buffer("prior_logits", a)
        mean = train_mean if train_mean is not None else torch.full((x_dim,), 0.5)
        self.register_buffer("x_mean", mean.detach().float().clone())  # [X]
        out = self.decoder if not nonlinear else self.decoder[-1]
        with torch.no_grad():
            out.bias.copy_(logit(self.x_mean))  # decoder output bias = logit of the training mean

    def context(self, x: Tensor) -> Tensor:
        return x - self.x_mean  # [B, X]

    def recognition_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def cost(self, x: Tensor, sample: Sampler, n_samples: int = 1) -> Tensor:
        logits = self.encoder(self.context(x)).unflatten(-1, (self.variables, self.classes))  # [B, V, K]
        q = categorical_layer(expand_samples(logits, n_samples))  # [S, B, V, K], a view
        z = sample("z1", q)  # [S, B, V, K] one-hot (or means / relaxed values; or [K', S, B, V, K])
        log_q = q.log_prob(z)  # [S, B]
        log_p = categorical_layer(self.prior_logits.expand_as(z)).log_prob(z)  # [S, B]
        x_logits = self.decoder(z.flatten(-2))  # [S, B, X]
        log_p = log_p + bernoulli_layer(x_logits).log_prob(x.expand_as(x_logits))  # [S, B]
        return log_q - log_p  # [S, B]

    @torch.no_grad()
    def generate(self, n: int) -> Tensor:
        """Pixel probabilities p(x | z) of ``n`` samples z ~ p(z), [n, X]."""
        z = torch.distributions.OneHotCategorical(
            logits=self.prior_logits.expand(n, -1, -1)
        ).sample()  # [n, V, K]
        return torch.sigmoid(self.decoder(z.flatten(-2)))  # [n, X]
