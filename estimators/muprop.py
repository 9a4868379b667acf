"""MuProp: likelihood ratio with a first-order Taylor control variate around the mean-field point.

    g = sum_i  grad_theta log p(z_i | pa_i) * [f(z) - f(z_bar) - f'(z_bar_i)^T (z_i - z_bar_i)]
      + sum_i  f'(z_bar_i)^T grad_theta mu_i(pa_i)
      + grad_theta f(z; theta)                                  (direct dependence, samples held fixed)

Gu, Levine, Sutskever, Mnih, "MuProp: Unbiased Backpropagation for Stochastic Neural Networks", ICLR 2016,
Eq. 3 and Algorithm 1. **Unbiased** for the plain, C and IDB variants. The VN variant is unbiased only up to a positive
scale of the latent-path gradient (as NVIL), so its instance declares ``unbiased = False``.
Latents: Bernoulli and one-hot categorical sites (z_bar_i = class probabilities, z_i one-hot), and Gaussian.

Algorithm 1, as implemented here:

1. mean-field pass: the model runs once with each site's mean in place of a sample, z_bar_1 = mu_1(x),
   z_bar_{i+1} = mu_{i+1}(z_bar_i), and ``f(z_bar)`` is the cost of that deterministic pass.
   ``f'(z_bar_i)`` is the **total** derivative d f(z_bar) / d z_bar_i through the mean-field network
   (the paper's form): Algorithm 1 takes Gradients(f(x_bar), x_bar_i)
   with x_bar_{i+1} a function of x_bar_i, and Eq. 11 carries the products mu'_j(x_bar_{j-1}) of the layers
   above, i.e. for a chain f'(z_bar_i) = df/dz_bar_i|_partial + sum_{j>i} (dz_bar_j/dz_bar_i)^T df/dz_bar_j|_partial.
   It is read off by autograd as the gradient with respect to a zero perturbation ``e_i`` added to each
   mean, z_bar_i = mu_i(z_bar_{i-1}) + e_i (every path from z_bar_i to f, direct and through the layers
   above, passes through e_i). The *partial* derivative (each mean detached before adding e_i, so the paths
   through z_bar_{i+1..L} are cut; ``MeanField(total=False)``) is no longer offered: on the
   structured-prediction model x -> h1 -> h2 -> y (f reads only h2) it is identically zero for h1, leaving h1
   with the constant control variate f(z_bar), and measured on 392-200-200-392 and SBN 200-200-784 it was
   never better (``bench/muprop_forms.py``: recognition-layer variance partial / total = 1.00-1.02 at
   initialisation and on SBN 200-200-784 after 1000 MuProp-C steps, 1.73-1.89 for h1 of 392-200-200-392
   after 1000 steps; 392-200-200-392 trained 3000 Adam steps with MuProp-C, seeds 0-2,
   ``bench/forms_training.py``: test NLL 85.68 +- 0.40 total, 86.09 +- 0.44 partial, total better on every
   seed). One pass with S = 1 serves all S samples: the mean-field point does not depend on the sample.
2. stochastic pass: exact samples, no gradient through their values; ``mu_i = dist.mean`` and
   ``log p(z_i | pa_i)`` are taken from the distribution the sampler sees, i.e. at the *sampled* parents.
3. surrogate ``c = f(z) + sum_i [ log p(z_i|pa_i) * SG(r_i) + mu_i^T SG(f'(z_bar_i)) ]`` with the per-layer
   residual ``r_i = f(z) - f(z_bar) - f'(z_bar_i)^T (z_i - z_bar_i)``.

Why it is unbiased (either derivative form). Write a_i = f'(z_bar_i) and b_i = f(z_bar) - a_i^T z_bar_i.
Both come from the deterministic pass: they are functions of x and theta only, never of the sample, and the
surrogate holds them constant (SG). The expected surrogate gradient of layer i's Taylor part, conditioned on
its parents pa_i (the samples of the layers below), is

    E[grad log p(z_i|pa_i) (b_i + a_i^T z_i) | pa_i] = b_i grad 1 + grad (a_i^T E[z_i|pa_i]) = a_i^T grad mu_i(pa_i),

using sum_z grad p(z|pa) = grad 1 = 0 and E[grad log p(z|pa) z] = grad E[z|pa] = grad mu_i(pa_i), with a_i and
b_i constants. The surrogate adds exactly a_i^T grad mu_i(pa_i) back, so the control variate of every layer
has zero mean given its parents, hence zero mean overall (tower rule), and E[g] = E[grad log p(z) f(z) +
grad f(z; theta)] = grad E[f]. Nothing here needs a_i to be a partial or a total derivative, only that it does
not depend on the sample: the total derivative changes which constant is used (and so the variance), not the
expectation. (A derivative taken at the *sampled* parents, or through the sample z_i itself, would depend on
z_i and break this.)

Variance reduction of the residual (MuProp-C, -C-VN, -C-IDB) goes through one ``SignalProcessor`` applied to
the stacked per-layer residuals ``[L, S, B]``. One shared processor rather than one per layer is a deliberate
choice: (a) what it subtracts (a moving-average constant c and an input-dependent B_psi(x)) never depends on
the current sample, so E[grad log p(z_i | pa_i) * (c + B_psi(x))] = 0 for *every* layer i whatever c and
psi are, i.e. sharing keeps the estimator unbiased; (b) the residuals of different layers share their large
part f(z) - f(z_bar), so one baseline fitted to all layers at once (least squares over the stack) is close to
each layer's own; (c) the processor exists from construction, so its IDB parameters are in the optimiser the
runner builds before the first step and the estimator's ``state_dict`` has the same keys before and after
any forward (per-layer processors created lazily on first use would be missed by both). With VN the
residual term *and* the correction term are divided by the same ``max(1, sqrt(v))``, so the whole
latent-path gradient is rescaled by one positive factor (dividing only the residual would mix the true
gradient with the Taylor approximation's gradient, a bias in direction).
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import CostFn, Estimate, Estimator, Trace, draw_detached, site_log_prob
from estimators.baselines import SignalProcessor
from models.members import member_mean, member_std, n_members, rows


class MeanField:
    """Sampler of the mean-field pass: returns each site's mean plus a zero perturbation leaf ``e_i``.

    The gradient of f(z_bar) with respect to ``e_i`` is d f / d z_bar_i: the total derivative when the mean
    keeps its graph (z_bar_{i+1} is then a function of z_bar_i; MuProp's form), the partial one with
    ``total=False`` (kept for comparisons: ``bench/muprop_forms.py``, tests).
    """

    def __init__(self, total: bool = True) -> None:
        self.total = bool(total)
        self.leaves: dict[str, Tensor] = {}  # e_i
        self.values: dict[str, Tensor] = {}  # z_bar_i

    def __call__(self, name: str, dist) -> Tensor:
        if name in self.leaves:
            raise ValueError(f"stochastic site {name!r} sampled twice in one pass; site names must be unique")
        mean = dist.mean  # [1, B, D_i]
        # total: keep mean's graph, so the layers above see z_bar_i through mu_{i+1}(z_bar_i) and the
        # gradient at e_i collects those paths too; partial: detached, z_bar_i enters f only directly
        mean = mean if self.total else mean.detach()
        e = torch.zeros_like(mean, requires_grad=True)  # [1, B, D_i], a leaf autograd.grad can reach
        self.leaves[name] = e
        self.values[name] = mean + e  # [1, B, D_i], equal to the mean in value
        return self.values[name]


class MuProp(Estimator):
    member_dim = True
    # The Taylor control variate needs only a mean and a log-density: Gaussian latents qualify as well, and
    # one-hot categorical sites, whose mean is the vector of class probabilities (z_bar_i = p_i(pa_i))
    supports = frozenset({"bernoulli", "categorical", "normal"})
    unbiased = True

    def __init__(
        self,
        n_samples: int = 1,
        centre: bool = False,
        normalise: bool = False,
        idb: bool = False,
        decay: float = 0.9,
        idb_hidden: int = 100,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        self.signal = SignalProcessor(centre, normalise, idb, context_dim, idb_hidden, decay)
        # VN rescales the latent-path gradient by 1 / max(1, sqrt(v)) but not the direct term: unbiased in
        # direction only, so the instance says biased (tests/test_biased.py then asks the bias to show)
        self.unbiased = not normalise

    def mean_field_sampler(self) -> MeanField:
        """The sampler of step 1 (a subclass may return ``MeanField(total=False)`` to compare forms)."""
        return MeanField()

    def mean_field(self, cost_fn: CostFn) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Step 1 of Algorithm 1: f(z_bar) [1, B], the points z_bar_i [1, B, D_i] and f'(z_bar_i) [1, B, D_i].

        All returned tensors are detached (constants of the surrogate).
        """
        sampler = self.mean_field_sampler()
        with torch.enable_grad():
            f_bar = cost_fn(sampler, 1)  # [1, B]
            names = list(sampler.leaves)
            # examples are independent, so the gradient of the sum is the per-example gradient; only the
            # leaves are asked for, so no parameter gradient is computed or accumulated
            grads = torch.autograd.grad(f_bar.sum(), [sampler.leaves[n] for n in names], allow_unused=True)
        z_bar = {n: sampler.values[n].detach() for n in names}  # [1, B, D_i]; constants from here on
        f_prime = {n: (g if g is not None else torch.zeros_like(z_bar[n])) for n, g in zip(names, grads)}
        return f_bar.detach(), z_bar, f_prime  # detached: the mean-field pass is a control variate only

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        f_bar, z_bar, f_prime = self.mean_field(cost_fn)
        trace = Trace(draw_detached)  # step 2: exact samples, no gradient through their values
        cost = cost_fn(trace, self.n_samples)  # [S, B], differentiable in theta through the direct path only
        if set(trace.sites) != set(z_bar):
            raise ValueError(
                f"the mean-field pass sampled sites {sorted(z_bar)} but the stochastic pass "
                f"{sorted(trace.sites)}: the model's sites must not depend on the sample values"
            )
        names = list(trace.sites)
        f_z = cost.detach()  # [S, B]; the learning signal is a constant weight on grad log p
        residual = torch.stack(
            [
                f_z - f_bar - (f_prime[n] * (trace.sites[n][1] - z_bar[n])).flatten(2).sum(-1)  # [S, B]
                for n in names
            ]
        )  # [L, S, B]
        scale = self._vn_scale(f_z)  # read before the processor updates its running variance
        adv, baseline_loss, diag = self.signal(
            residual, context, update=self.update_state
        )  # [L, S, B], detached
        log_p = torch.stack([site_log_prob(*trace.sites[n]) for n in names])  # [L, S, B], grad in theta
        # mu_i at the sampled parents: its theta-gradient is the path the Taylor term integrates analytically
        mu_dot_fp = torch.stack(
            [
                (trace.sites[n][0].mean * f_prime[n]).flatten(2).sum(-1)
                for n in names  # [S, B]
            ]
        )  # [L, S, B]
        # + cost: direct dependence of f on theta at the fixed sample (decoder, explicit log q terms);
        # + log_p * adv: score function times the (processed) Taylor residual, >0 adv pushes log p down as the
        #   cost is minimised; + mu^T f'(z_bar) / scale: adds back the control variate's expectation (same
        #   positive VN scale as the residual term). baseline_loss trains the IDB net only.
        surrogate = (cost + (log_p * adv).sum(0) + mu_dot_fp.sum(0) / scale).mean() + baseline_loss
        m = n_members(self.signal.mean.value, 0)  # None: one run; else each member's own statistics
        diag = {
            **diag,
            "residual_std": member_std(residual.detach(), m) if residual.numel() > 1 else 0.0,
            "cost_minus_mean_field": member_mean((f_z - f_bar).detach(), m),
        }
        return Estimate(f_z, surrogate, diag)

    def _vn_scale(self, like: Tensor) -> Tensor | float:
        """The VN divisor max(1, sqrt(v)) the signal processor applies this step (1 without VN), for the rows
        of ``like`` [S, B]."""
        if not self.signal.normalise:
            return 1.0
        return rows(self.signal.scale(), like)  # a running statistic, constant
