"""Stochastic variational inference with a diagonal-Gaussian mixture posterior for a fixed target.

    q_theta(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2),   theta = (logits a, loc mu, log-scale log sigma)
    cost(z)    = log q_theta(z) - log p~(z),              E_q[cost] = KL(q || p) - log Z = -ELBO

``p~`` is a fixed unnormalised multimodal density, ``Z = int p~`` its normaliser (known in closed form for
every target here, so ``kl_to_target`` reports KL(q || p) = -ELBO + log Z):

* ``ring``              2-D: log p~ = -(|z| - r)^2 / (2 w^2);
                        Z = 2 pi (w^2 exp(-r^2 / 2 w^2) + r w sqrt(2 pi) Phi(r / w)).
* ``banana``            2-D: z_1 ~ N(0, a^2), z_2 | z_1 ~ N(c (z_1^2 - a^2), s^2) (a sheared Gaussian with unit
                        Jacobian), Z = 2 pi a s.
* ``gaussian_mixture``  any D: ``target_components`` Gaussians of scale ``target_scale`` with unequal
                        weights proportional to 1, 2, ..., n; centres on a circle of radius ``separation`` in
                        2-D, at ``separation`` times fixed random unit directions otherwise (D = 10 is the
                        higher-dimensional preset). Normalised: Z = 1.

There is no data. To fit the runner's interface the model takes the synthetic data source's all-zero
``x`` of shape ``[B, X]`` and uses it only for the batch size: each "example" is one more independent
draw of the ELBO estimate, so a batch of B with S samples each gives S * B samples of q per step.
``latent_kind = "mixture"``: q is described as ``MixtureSameFamily(Categorical, Independent(Normal, 1))``
and the estimator decides how it is sampled. Costs broadcast over extra leading dims of z.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributions import MixtureSameFamily

from models.base import LatentVariableModel, Sampler
from models.mixture_vae import diag_normal_mixture

TARGETS = ("ring", "gaussian_mixture", "banana")
TWO_D_ONLY = ("ring", "banana")


class MixtureSVI(LatentVariableModel):
    latent_kind = "mixture"
    data_kind = "none"  # a fixed target: data=synthetic only supplies the batch size

    def __init__(
        self,
        x_dim: int = 1,
        target: str = "ring",
        latent_dim: int = 2,
        components: int = 8,
        init_scale: float = 1.0,
        ring_radius: float = 2.0,
        ring_width: float = 0.2,
        banana_scale: float = 1.5,
        banana_curvature: float = 0.5,
        banana_width: float = 0.5,
        target_components: int = 6,
        separation: float = 4.0,
        target_scale: float = 0.5,
        target_seed: int = 0,
        train_mean: Tensor | None = None,
        name: str = "mixture_svi",
    ):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"model.target={target!r}: choose one of {', '.join(TARGETS)}")
        if target in TWO_D_ONLY and int(latent_dim) != 2:
            raise ValueError(f"model.target={target} is 2-D: set model.latent_dim=2 (got {latent_dim})")
        if int(latent_dim) < 1 or int(components) < 1 or int(target_components) < 1:
            raise ValueError(
                f"model.latent_dim, model.components and model.target_components must be >= 1, got "
                f"{latent_dim}, {components}, {target_components}"
            )
        for key, value in [
            ("init_scale", init_scale),
            ("ring_radius", ring_radius),
            ("ring_width", ring_width),
            ("banana_scale", banana_scale),
            ("banana_width", banana_width),
            ("target_scale", target_scale),
        ]:
            if not float(value) > 0:
                raise ValueError(f"model.{key}={value!r}: choose a number > 0")
        self.context_dim = x_dim
        self.target = target
        self.latent_dim = d = int(latent_dim)
        self.components = k = int(components)
        # variational parameters: the "recognition model" of SVI
        self.logits = nn.Parameter(torch.zeros(k))  # [K]
        self.loc = nn.Parameter(float(init_scale) * torch.randn(k, d))  # [K, D], global RNG (run seed)
        self.log_scale = nn.Parameter(torch.zeros(k, d))  # [K, D]
        self.ring = (float(ring_radius), float(ring_width))
        self.banana = (float(banana_scale), float(banana_curvature), float(banana_width))
        # target mixture (buffers: fixed, moved with the model, saved in the checkpoint)
        n = int(target_components)
        if d == 2:
            angle = 2 * math.pi * torch.arange(n) / n  # [n]
            centres = float(separation) * torch.stack([angle.cos(), angle.sin()], -1)  # [n, 2]
        else:
            gen = torch.Generator().manual_seed(int(target_seed))
            direction = torch.randn(n, d, generator=gen)  # [n, D]
            centres = float(separation) * direction / direction.norm(dim=-1, keepdim=True)  # [n, D]
        weights = torch.arange(1, n + 1, dtype=torch.float32)  # [n], unequal so the logits matter
        self.register_buffer("target_logits", (weights / weights.sum()).log())  # [n]
        self.register_buffer("target_loc", centres)  # [n, D]
        self.register_buffer("target_scale", torch.full((n, d), float(target_scale)))  # [n, D]

    # ---------------------------------------------------------------------------------------------
    # q and the target

    def recognition_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()  # all of theta is variational

    def variational(self) -> MixtureSameFamily:
        return diag_normal_mixture(self.logits, self.loc, self.log_scale.exp())  # batch [], event [D]

    def target_mixture(self) -> MixtureSameFamily:
        return diag_normal_mixture(
            self.target_logits, self.target_loc, self.target_scale
        )  # batch [], event [D]

    def log_target(self, z: Tensor) -> Tensor:
        """log p~(z), reducing only the last dim: ``[..., D] -> [...]``."""
        if self.target == "ring":
            r, w = self.ring
            return -0.5 * ((z.norm(dim=-1) - r) / w).square()  # [...]
        if self.target == "banana":
            a, c, s = self.banana
            z1, z2 = z[..., 0], z[..., 1]  # [...] each
            return -0.5 * (z1 / a).square() - 0.5 * ((z2 - c * (z1.square() - a * a)) / s).square()  # [...]
        return self.target_mixture().log_prob(z)  # [...]

    def log_normaliser(self) -> float:
        """log Z = log int p~(z) dz, exact."""
        if self.target == "ring":
            r, w = self.ring
            radial = w * w * math.exp(-0.5 * (r / w) ** 2) + r * w * math.sqrt(2 * math.pi) * 0.5 * math.erfc(
                -r / (w * math.sqrt(2))
            )  # int_0^inf rho exp(-(rho - r)^2 / 2 w^2) d rho
            return math.log(2 * math.pi * radial)
        if self.target == "banana":
            a, _, s = self.banana
            return math.log(2 * math.pi * a * s)
        return 0.0

    # ---------------------------------------------------------------------------------------------
    # what the runner and the estimators see

    def cost(self, x: Tensor, sample: Sampler, n_samples: int = 1) -> Tensor:
        """log q(z) - log p~(z), ``[S, B]``; ``x`` ([B, X], zeros) only sets the batch size B."""
        q = self.variational().expand((n_samples, x.shape[0]))  # batch [S, B], event [D]
        z = sample("z", q)  # [S, B, D] (or [K, S, B, D])
        return q.log_prob(z) - self.log_target(z)  # [..., S, B]

    @torch.no_grad()
    def kl_to_target(self, n: int = 10000) -> float:
        """KL(q || p) = E_q[log q - log p~] + log Z, by ``n`` exact samples of q (Monte Carlo, unbiased)."""
        q = self.variational()
        z = q.sample((n,))  # [n, D]
        return float((q.log_prob(z) - self.log_target(z)).mean()) + self.log_normaliser()

    @torch.no_grad()
    def plot(self, path: str | Path, grid: int = 200, n_kl: int = 10000) -> Path:
        """Save a PNG: target density, fitted q, and q's samples over the target (2-D only)."""
        if self.latent_dim != 2:
            raise ValueError(f"plot draws 2-D densities; this model has latent_dim={self.latent_dim}")
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - Agg, no display
        from matplotlib.figure import Figure  # noqa: PLC0415

        dev = self.loc.device
        lim = float(max(4.0, self.target_loc.abs().max() + 3 * self.target_scale.max()))
        if self.target == "ring":
            lim = self.ring[0] + 1.5
        ax_vals = torch.linspace(-lim, lim, grid, device=dev)  # [G]
        gx, gy = torch.meshgrid(ax_vals, ax_vals, indexing="xy")  # [G, G] each
        pts = torch.stack([gx, gy], -1)  # [G, G, 2]
        p = (self.log_target(pts) - self.log_normaliser()).exp().cpu()  # [G, G]
        q = self.variational().log_prob(pts).exp().cpu()  # [G, G]
        samples = self.variational().sample((500,)).cpu()  # [500, 2]
        kl = self.kl_to_target(n_kl)

        fig = Figure(figsize=(12, 4), dpi=100)
        FigureCanvasAgg(fig)
        extent = (-lim, lim, -lim, lim)
        for i, (img, title) in enumerate(
            [(p, f"target p ({self.target})"), (q, f"q: {self.components} components")]
        ):
            ax = fig.add_subplot(1, 3, i + 1)
            ax.imshow(img.numpy(), origin="lower", extent=extent, cmap="viridis")
            ax.set_title(title)
        ax = fig.add_subplot(1, 3, 3)
        ax.contour(gx.cpu().numpy(), gy.cpu().numpy(), p.numpy(), levels=6, cmap="Greys", linewidths=0.6)
        ax.scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.5, color="tab:red")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(f"samples of q; KL(q||p) = {kl:.3f}")
        for ax in fig.axes:
            ax.set_aspect("equal")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path
