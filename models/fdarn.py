"""fDARN 200-784: a one-layer SBN whose prior has autoregressive connections within the latent layer.

Mnih & Gregor, "Neural Variational Inference and Learning in Belief Networks" (NVIL), ICML 2014, Sec. 6
(MNIST experiments, "fDARN" rows), after Gregor, Danihelka, Mnih, Blundell, Wierstra, "Deep AutoRegressive
Networks" (DARN), ICML 2014; reused as "fDARN 200-784" in MuProp's Table 3 (Gu et al. 2016). D = 200 binary
latents h, X = 784 pixels:

    p(h)     = prod_j Bernoulli(h_j; sigmoid(b_j + sum_{k<j} A_jk h_k))      (autoregressive prior)
    p(x | h) = prod_d Bernoulli(x_d; sigmoid(W h + c)_d)                      (factorial visible layer)
    q(h | x) = prod_j Bernoulli(h_j; sigmoid(U (x - mean) + e)_j)             (factorial recognition model)

Cost per example (negative ELBO): log q(h | x) - log p(h) - log p(x | h). The autoregressive prior is part of
the cost: one masked linear map, evaluated at whatever value the estimator hands back for h (a sample, the
mean-field point, a relaxed value), so every Bernoulli estimator serves this model unchanged; the one
stochastic site is q's.

Assumptions (NVIL describes fDARN in a few lines; the MuProp paper only names it):
* autoregressive connections in the generative model's latent layer only (the "f", fast, DARN: no
  autoregressive connections among the pixels; ``visible_autoregressive: true`` adds them, p(x_d | h, x_<d)
  with a strictly lower-triangular map of the pixels, for comparison);
* a factorial (SBN-like) recognition model q(h | x), as in NVIL's SBN experiments: an autoregressive q would be
  a sequential site with no closed-form mean, which MuProp's mean-field pass needs;
* linear maps, as the "200-784" SBN rows of the same table; the autoregressive weights A start at zero (the
  model starts as SBN 200-784), the recognition net sees mean-centred pixels and the decoder's output bias
  starts at the logit of the training mean, as for the SBN.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from models.base import LatentVariableModel, Sampler, expand_samples, logit
from models.sbn import bernoulli_layer


class FDARN(LatentVariableModel):
    latent_kind = "bernoulli"

    def __init__(
        self,
        x_dim: int,
        latent: int = 200,
        visible_autoregressive: bool = False,
        train_mean: Tensor | None = None,
        name: str = "fdarn",
    ):
        super().__init__()
        if int(latent) < 1:
            raise ValueError(f"model.latent must be a positive number of units, got {latent}")
        self.latent = int(latent)
        self.layers = [self.latent]  # one stochastic site (tests enumerate its states from here)
        self.context_dim = x_dim
        self.encoder = nn.Linear(x_dim, self.latent)
        self.decoder = nn.Linear(self.latent, x_dim)
        self.prior_bias = nn.Parameter(torch.zeros(self.latent))  # [D] b
        self.prior_ar = nn.Parameter(torch.zeros(self.latent, self.latent))  # [D, D] A, masked below
        self.register_buffer("ar_mask", torch.ones(self.latent, self.latent).tril(-1))  # [D, D], k < j only
        self.visible_ar = None
        if visible_autoregressive:
            self.visible_ar = nn.Parameter(torch.zeros(x_dim, x_dim))  # [X, X], masked below
            self.register_buffer("visible_mask", torch.ones(x_dim, x_dim).tril(-1))
        mean = train_mean if train_mean is not None else torch.full((x_dim,), 0.5)
        self.register_buffer("x_mean", mean.detach().float().clone())  # [X]
        with torch.no_grad():
            self.decoder.bias.copy_(logit(self.x_mean))  # decoder output bias = logit of the training mean

    def context(self, x: Tensor) -> Tensor:
        return x - self.x_mean  # [B, X]

    def recognition_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def prior_logits(self, h: Tensor) -> Tensor:
        """b_j + sum_{k<j} A_jk h_k for every j at once (the mask keeps only k < j): [.., D]."""
        return h @ (self.prior_ar * self.ar_mask).T + self.prior_bias

    def cost(self, x: Tensor, sample: Sampler, n_samples: int = 1) -> Tensor:
        q = bernoulli_layer(expand_samples(self.encoder(self.context(x)), n_samples))  # [S, B, D]
        h = sample("z1", q)  # [S, B, D] (or [K, S, B, D])
        log_q = q.log_prob(h)  # [S, B]
        log_p = bernoulli_layer(self.prior_logits(h)).log_prob(h)  # [S, B], autoregressive prior
        x_logits = self.decoder(h)  # [S, B, X]
        if self.visible_ar is not None:
            x_logits = x_logits + x @ (self.visible_ar * self.visible_mask).T  # [S, B, X], x_<d -> x_d
        log_p = log_p + bernoulli_layer(x_logits).log_prob(x.expand_as(x_logits))  # [S, B]
        return log_q - log_p  # [S, B]

    @torch.no_grad()
    def generate(self, n: int) -> Tensor:
        """Pixel probabilities p(x | h) of ``n`` ancestral samples h ~ p(h) (one unit at a time), [n, X].
        With autoregressive pixels, the pixels are sampled in order and their probabilities returned."""
        h = self.prior_bias.new_zeros(n, self.latent)  # [n, D]
        for j in range(self.latent):  # h_j depends on h_<j only; later units are still zero here
            h[:, j] = torch.bernoulli(torch.sigmoid(self.prior_logits(h)[:, j]))
        base = self.decoder(h)  # [n, X]
        if self.visible_ar is None:
            return torch.sigmoid(base)
        x, probs = torch.zeros_like(base), torch.zeros_like(base)
        ar = self.visible_ar * self.visible_mask
        for d in range(base.shape[1]):
            probs[:, d] = torch.sigmoid(base[:, d] + x @ ar[d])
            x[:, d] = torch.bernoulli(probs[:, d])
        return probs
