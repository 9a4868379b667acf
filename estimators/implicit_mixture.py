"""Implicit reparameterization through a mixture of diagonal Gaussians (Graves 2016).

    g = grad_theta f(x(theta, u)),   x = T_theta^{-1}(u),  u ~ Uniform[0, 1]^D,
    dx/dtheta = -J^{-1} dT/dtheta,   T = (F_1(x_1), F_2(x_2 | x_1), ..., F_D(x_D | x_<D))

T is the distributional transform of the mixture (REFERENCE.md Sec. 5). Graves 2016, "Stochastic
Backpropagation through Mixture Density Distributions", arXiv:1607.05690, Sec. 2 (the forward
substitution for dx_d/dtheta); equivalently Figurnov et al. 2018, "Implicit Reparameterization
Gradients", eq. 5. Unbiased for smooth f.

Every mixture site (``MixtureSameFamily(Categorical, Independent(Normal, 1))``) is turned into a
``DiagNormalMixture`` (estimators/mixture_dist.py) and rsampled; its backward is the implicit gradient.
How loc and scale receive gradient is the ``component_grad`` option (a YAML variant, not a class):

* ``implicit_mixture.yaml`` (``component_grad: implicit``): every component through T, so all components
  get gradient every step (TensorFlow Probability's ``MixtureSameFamily(reparameterize=True)``).
* ``graves_mixture.yaml`` (``component_grad: graves``): logits through T; loc and scale by the ordinary
  reparameterization ``x = mu_k + sigma_k eps`` of the sampled component ``k`` only (Graves' combination).

Gaussian sites (``Independent(Normal, 1)``) are plain reparameterized samples, so the estimator also
serves a Gaussian VAE (where it is ``reparam``: a one-component mixture has w = 1 and J diagonal).
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Distribution, Independent, MixtureSameFamily, Normal

from estimators.base import CostFn, Estimate, Estimator, Trace
from estimators.mixture_dist import COMPONENT_GRADS, DiagNormalMixture


def mixture_parameters(name: str, dist: MixtureSameFamily) -> tuple[Tensor, Tensor, Tensor]:
    """(logits ``[..., K]``, loc ``[..., K, D]``, scale ``[..., K, D]``) of a diagonal-Gaussian mixture site."""
    comp = dist.component_distribution
    if not (
        isinstance(comp, Independent)
        and isinstance(comp.base_dist, Normal)
        and comp.reinterpreted_batch_ndims == 1
    ):
        raise ValueError(
            f"site {name!r}: mixture estimators need MixtureSameFamily(Categorical, Independent(Normal, 1)); "
            f"got components {type(comp).__name__}"
        )
    return dist.mixture_distribution.logits, comp.base_dist.loc, comp.base_dist.scale


def is_gaussian(dist: Distribution) -> bool:
    """A (possibly Independent-wrapped) Normal site: reparameterized by every mixture estimator."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    return isinstance(base, Normal)


def unsupported_site(name: str, dist: Distribution) -> ValueError:
    return ValueError(
        f"site {name!r}: mixture estimators serve MixtureSameFamily(Categorical, Independent(Normal, 1)) and "
        f"Normal sites, got {type(dist).__name__}"
    )


class ImplicitMixture(Estimator):
    supports = frozenset({"mixture", "normal"})
    unbiased = True

    def __init__(
        self,
        n_samples: int = 1,
        component_grad: str = "implicit",
        block_size: int = 16,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        if component_grad not in COMPONENT_GRADS:
            raise ValueError(
                f"estimator.component_grad={component_grad!r}: choose one of {', '.join(COMPONENT_GRADS)}"
            )
        if int(block_size) < 1:
            raise ValueError(f"estimator.block_size={block_size!r}: choose an integer >= 1")
        self.component_grad = component_grad
        self.block_size = int(block_size)

    def draw(self, name: str, dist: Distribution) -> Tensor:
        if isinstance(dist, MixtureSameFamily):
            logits, loc, scale = mixture_parameters(name, dist)
            mixture = DiagNormalMixture(
                logits,
                loc,
                scale,
                validate_args=False,
                component_grad=self.component_grad,
                block_size=self.block_size,
            )
            return mixture.rsample()  # [S, B, D]; exact sample, implicit gradient in its backward
        if is_gaussian(dist):
            return dist.rsample()  # [S, B, D]
        raise unsupported_site(name, dist)

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        cost = cost_fn(Trace(self.draw), self.n_samples)  # [S, B], differentiable through the samples
        return Estimate(cost.detach(), cost.mean())
