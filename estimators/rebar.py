"""REBAR: REINFORCE with a Concrete-relaxation control variate, its temperature and scale learned.

For one layer of Bernoulli units with logits l, z = l + log u - log(1 - u) (u ~ U(0, 1)), b = H(z):

    g_l = [f(b) - eta f(s(z_t))] d log p(b) / dl  +  eta d f(s(z)) / dl  -  eta d f(s(z_t)) / dl,
    s(z) = sigmoid(z / tau),   z_t ~ p(z | b) (conditional reparameterization, noise v independent of b)

Tucker, Mnih, Maddison, Lawson, Sohl-Dickstein, "REBAR: Low-variance, unbiased gradient estimates for discrete
latent variable models", NIPS 2017: the REBAR estimator with the conditional-noise control variate, and tau and
eta trained by minimising a single-sample variance estimate (equation numbers not given: they could not be
checked against the paper offline). **Unbiased** for every tau > 0 and eta: the last three terms have zero mean,
because E_u[f(s(z))] = E_b[E_v[f(s(z_t))]] (the derivative of the left is the pathwise term, of the right the
score term plus the conditional pathwise term).

Implementation choices, following the reference code (tensorflow/models research/rebar, whose per-layer form
duvenaud/relax ``binary_vae_multilayer_per_layer.py`` copies):

* **Tied noise.** z_t is built from the same u as z: given b = 1, v = (u - u') / (1 - u') with u' = sigmoid(-l)
  is U(0, 1) and independent of b (likewise v = u / u' given b = 0), and z_t = l + logit(w(v, l)) with w
  inverting that map, so z_t = z *in value* while dz_t/dl != dz/dl = 1 (v held fixed). Hence f(s(z_t)) = f(s(z))
  and one relaxed evaluation serves both terms: d f(s(z_t))/dl = G dz_t/dl with G = df(s(z))/dz, and

      g_l = [f(b) - c(z)] (b - sigmoid(l)) + G (1 - dz_t/dl),   c(z) = eta f(s(z)),  G = dc/dz.

  dz_t/dl in closed form: p - (1 - u)(1 - p)/u if b = 1, (1 - p) - u p / (1 - u) if b = 0 (p = sigmoid(l)).
* **Multi-layer SBNs, per layer** (the reference's per-layer form). One hard
  pass draws b_1..b_L with uniforms u_i. For layer i the control variate is f at a relaxed pass that replays
  b_<i, relaxes layer i (z_i = l_i + logit(u_i) as a leaf) and continues *relaxed* above it with the same
  uniforms, s((l_j(relaxed parents) + logit(u_j)) / tau_j): a continuation through hard samples would make the
  relaxed f discontinuous in z_i and the pathwise term biased. g_{l_i} is pushed into the parameters by the
  chain rule through l_i(b_<i), the logits of the hard pass at its sampled (detached) parents; given b_<i each
  layer's correction has zero mean, so the sum is unbiased. The model's parameters get, besides, the direct
  gradient of f(b) with the samples held fixed (decoder, log q terms), as in the reference. The L relaxed
  passes run as one call with L * S samples (block i relaxes layer i); cost per step: one hard pass, one
  relaxed pass of L * S samples with its backward to the leaves z_i, plus (when training tau and eta) the
  double backward of the variance objective.
* **Variance objective.** Following the reference, the objective is the mean square of the per-unit signal
  g_{l_i} (the gradient in logit space, before the chain rule into the weights), summed over layers:
  V = sum_i mean_{S,B} sum_D g_{l_i}^2. Its expectation is Var + const because g is unbiased for every
  (tau, eta), so dV/d(tau, eta) is an unbiased estimate of the variance's gradient. G is computed with
  ``create_graph`` so that V is differentiable in log tau and eta; the estimator takes dV/dphi itself with
  ``torch.autograd.grad`` over its own parameters and returns it through the surrogate as
  sum_phi (phi - SG(phi)) * SG(u_phi), a term of value zero whose gradient is u_phi, so one
  ``surrogate.backward()`` trains the model (with g) and tau, eta (with u). The model's parameter gradient
  never sees V. u_phi = (dV/dphi) / (sqrt(r_phi) + 1e-8) with r_phi a running mean of (dV/dphi)^2 per element
  (``rms_decay``; RMSprop's preconditioning, the first step's r is its own square): the reference trains phi
  with a separate Adam, whose steps ignore the gradient's scale, while here phi shares the runner's optimiser.
  Measured on an SBN 200-200-784 at init (random binary batch of 100): raw dV/deta = -3.9e5 (V = 3.1e3), and
  under SGD (lr 1e-3, momentum 0.9) tau was inf by step 3; dividing by a running mean of V still sent eta to
  -0.27 and V to 2e7 within 4 steps; preconditioned, eta and tau moved by ~1e-2 over 30 steps while V fell.
  Under Adam the preconditioning changes little (Adam divides by the same kind of statistic). The
  running means are buffers (checkpointed). With ``update_state = False`` (variance measurement) V is not
  differentiated and no running state changes.
* Per-layer log-temperature and eta (initial tau = 0.5, eta = 1 as in the reference), stored for up to
  ``max_layers`` layers so that the state_dict and the optimiser's parameter list exist before the first
  forward (the number of layers is known only when the model runs); a deeper model raises ``ValueError``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from estimators.base import CostFn, Estimate, Estimator, Trace, bernoulli_logits


def logistic_noise(u: Tensor) -> Tensor:
    """logit(u) = log u - log(1 - u), the noise of z = l + logit(u)."""
    return torch.log(u) - torch.log1p(-u)


def uniform_like(t: Tensor) -> Tensor:
    """U(0, 1) draws kept off {0, 1} so that logit(u) is finite."""
    eps = torch.finfo(t.dtype).eps
    return torch.rand_like(t).clamp(eps, 1.0 - eps)


def conditional_logit_slope(u: Tensor, b: Tensor, p: Tensor) -> Tensor:
    """dz_t / dl of the tied conditional sample z_t(v, l) at v = v(u), where z_t = z in value; [S, B, D].

    b = 1: w = v (1 - u') + u', u' = 1 - p, so z_t = l + log w - log(1 - w) has slope p - (1 - u)(1 - p) / u;
    b = 0: w = v u', slope (1 - p) - u p / (1 - u). Both are bounded (u > 1 - p when b = 1, u < 1 - p when 0).
    """
    one = p - (1 - u) * (1 - p) / u
    zero = (1 - p) - u * p / (1 - u)
    return torch.where(b > 0.5, one, zero)  # [S, B, D]


class REBAR(Estimator):
    supports = frozenset({"bernoulli"})
    unbiased = True

    def __init__(
        self,
        n_samples: int = 1,
        temperature: float = 0.5,
        eta: float = 1.0,
        max_layers: int = 4,
        rms_decay: float = 0.99,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        if not temperature > 0:
            raise ValueError(f"estimator.temperature must be > 0, got {temperature}")
        if int(max_layers) < 1:
            raise ValueError(f"estimator.max_layers must be >= 1, got {max_layers}")
        self.max_layers = int(max_layers)
        # log-parameterised: tau stays positive whatever step the optimiser takes
        self.log_temperature = nn.Parameter(torch.full((self.max_layers,), math.log(temperature)))  # [Lmax]
        self.eta = nn.Parameter(torch.full((self.max_layers,), float(eta)))  # [Lmax]
        if not 0.0 <= rms_decay < 1.0:
            raise ValueError(f"estimator.rms_decay must be in [0, 1), got {rms_decay}")
        self.rms_decay = float(rms_decay)
        self.register_buffer("rms_initialised", torch.zeros((), dtype=torch.bool))
        self.register_rms_buffers()

    def register_rms_buffers(self) -> None:
        """One running mean of the squared variance gradient per parameter of the estimator (subclasses that
        add parameters call this again at the end of their constructor: buffers exist before any forward)."""
        for name, p in self.named_parameters():
            key = "rms_" + name.replace(".", "_")
            if not hasattr(self, key):
                self.register_buffer(key, torch.zeros_like(p.detach()))

    # ---------------------------------------------------------------------------------------------
    # the control variate: REBAR's is eta * f(s(z)); RELAX adds a learned net (estimators/relax.py)

    def control_variate(
        self, layer: int, f_relaxed: Tensor, z: Tensor, hard_below: list[Tensor], context: Tensor | None
    ) -> Tensor:
        """c_i(z_i) [S, B] for layer ``layer`` from the relaxed cost [S, B] and the leaf z_i [S, B, D_i]."""
        return self.eta[layer] * f_relaxed  # [S, B]

    def control_variate_penalty(self, n_layers: int) -> Tensor | float:
        """Extra term of the variance objective for a model of ``n_layers`` (RELAX: weight decay of its nets)."""
        return 0.0

    # ---------------------------------------------------------------------------------------------

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        noise: dict[str, Tensor] = {}
        uniforms: dict[str, Tensor] = {}

        def draw_hard(name: str, dist: Distribution) -> Tensor:
            logits = bernoulli_logits(dist)  # [S, B, D]
            u = uniform_like(logits)  # [S, B, D]
            uniforms[name], noise[name] = u, logistic_noise(u)
            # detached: an exact sample b = H(l + logit(u)) ~ Bernoulli(sigmoid(l)), no gradient through it
            return (logits.detach() + noise[name] > 0).to(logits.dtype)  # [S, B, D]

        hard = Trace(draw_hard)
        cost = cost_fn(hard, self.n_samples)  # [S, B], graph for the direct dependence on theta
        f_b = cost.detach()  # [S, B]; the learning signal is a constant weight
        names = list(hard.sites)
        n_layers, s = len(names), self.n_samples
        if n_layers > self.max_layers:
            raise ValueError(
                f"{type(self).__name__}: the model has {n_layers} stochastic layers but the estimator holds "
                f"temperatures for {self.max_layers}; set estimator.max_layers >= {n_layers}"
            )
        logits = {n: bernoulli_logits(hard.sites[n][0]) for n in names}  # [S, B, D_i], differentiable
        samples = {n: hard.sites[n][1] for n in names}  # [S, B, D_i]
        train_cv = self.update_state and torch.is_grad_enabled()
        leaves: dict[str, Tensor] = {}

        with torch.enable_grad():
            tau = self.log_temperature.exp()  # [Lmax]

            def draw_relaxed(name: str, dist: Distribution) -> Tensor:
                """All L relaxed passes in one call: block i replays b_<i, relaxes layer i, continues relaxed."""
                if name not in noise:
                    raise ValueError(
                        f"site {name!r} was not sampled in the hard pass; sites must not depend on samples"
                    )
                k = names.index(name)
                rows = bernoulli_logits(dist)  # [L*S, B, D] at each block's parents
                blocks = []
                for i in range(n_layers):
                    if k < i:  # below the relaxed layer: replay the hard trajectory
                        blocks.append(samples[name])
                    elif k == i:  # the relaxed layer: z_k = l_k + logit(u_k), a leaf (l_k of the hard pass)
                        z = (logits[name].detach() + noise[name]).requires_grad_(True)  # [S, B, D]
                        leaves[name] = z
                        blocks.append(torch.sigmoid(z / tau[k]))  # [S, B, D]
                    else:  # above it: relaxed with the same uniforms, logits at the relaxed parents
                        blocks.append(
                            torch.sigmoid((rows[i * s : (i + 1) * s] + noise[name]) / tau[k])
                        )  # [S, B, D]
                return torch.cat(blocks, 0)  # [L*S, B, D]

            f_relaxed = cost_fn(Trace(draw_relaxed), n_layers * s).reshape(n_layers, s, -1)  # [L, S, B]
            hard_below = [samples[n] for n in names]
            cv = [
                self.control_variate(i, f_relaxed[i], leaves[n], hard_below[:i], context)
                for i, n in enumerate(names)
            ]  # L x [S, B]
            # G_i = dc_i/dz_i; rows of the cost do not mix and leaf i feeds only block i, so one backward
            # gives every layer's derivative. create_graph: V below is differentiated in log tau, eta.
            grads = torch.autograd.grad(
                torch.stack(cv).sum(), [leaves[n] for n in names], create_graph=train_cv
            )  # L x [S, B, D_i]
            signals = []
            for i, n in enumerate(names):
                b = samples[n]  # [S, B, D]
                p = torch.sigmoid(logits[n].detach())  # [S, B, D]
                slope = conditional_logit_slope(uniforms[n], b, p)  # [S, B, D], dz_t/dl
                # score term with the CV subtracted (d log p(b)/dl = b - p) plus the two pathwise terms
                signals.append((f_b - cv[i]).unsqueeze(-1) * (b - p) + grads[i] * (1 - slope))  # [S, B, D_i]
            # + l_i * SG(g_i): g_i estimates dE[f]/dl_i (f is minimised), pushed into theta by the chain rule;
            # + cost: direct dependence of f on theta at the hard sample (samples held fixed)
            surrogate = (cost + sum((logits[n] * g.detach()).sum(-1) for n, g in zip(names, signals))).mean()
            variance = sum(g.square().sum(-1).mean() for g in signals)  # V: single-sample variance estimate
            diag = {"variance_objective": variance.detach()}
            if train_cv:
                own = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
                d_own = torch.autograd.grad(
                    variance + self.control_variate_penalty(n_layers), [p for _, p in own], allow_unused=True
                )
                first, beta = not bool(self.rms_initialised), self.rms_decay
                for (n, p), g in zip(own, d_own):
                    if g is None:
                        continue
                    r = getattr(self, "rms_" + n.replace(".", "_"))  # same shape as p
                    with torch.no_grad():  # running state, not part of any graph
                        r.copy_(g.square() if first else beta * r + (1 - beta) * g.square())
                    u = g.detach() / (r.sqrt() + 1e-8)  # preconditioned variance gradient
                    # value 0, gradient u: trains tau, eta (and RELAX's net) in the same backward as the model
                    surrogate = surrogate + ((p - p.detach()) * u).sum()
                self.rms_initialised.fill_(True)
        for i in range(n_layers):
            diag[f"temperature_{i + 1}"] = tau[i].detach()
            diag[f"eta_{i + 1}"] = self.eta[i].detach()
        return Estimate(f_b, surrogate, diag)
