"""Mixture estimators on the mixture VAE: gradient variance per parameter group, and short training runs.

1. Variance. At fixed parameters of a ``MixtureVAE`` (conf/model/mixture_vae.yaml) and on one fixed minibatch,
   draw M independent gradient estimates per estimator and report the mean over parameters of the
   per-parameter variance (unbiased, float64 sums; the method of runners/variance.py) for each group:
   the rows of the encoder's output layer that produce the mixture ``logits``, the component ``loc``s and
   the ``scale``s, the whole encoder, the decoder. Measured at the initial parameters and, after part 2,
   at the parameters that the ``implicit_mixture`` run reached (the same parameters for every estimator).
2. Training. ``experiment=mixture_vae`` for ``--steps`` steps per estimator (in-process, the same code path
   as ``python run.py experiment=mixture_vae estimator=<e> train.steps=<steps> data.root=<root>``), each in
   its own run directory with ``metrics.jsonl``; the table lists train/val ELBO along the way and the final
   test ELBO and importance-weighted bound.
3. SVI (``--svi-steps``). ``experiment=mixture_svi_ring`` and ``mixture_svi_gmm10`` per estimator: KL(q || p) of
   the fitted mixture (``MixtureSVI.kl_to_target``, 20k samples) and, for the ring, ``fit_<estimator>.png``.

    python bench/bench_mixture_estimators.py --data-root /work/shared/data --steps 500 --svi-steps 1500
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.mixture_vae import MixtureVAE  # noqa: E402
from runners.train import train  # noqa: E402

ESTIMATORS = [
    "implicit_mixture",
    "graves_mixture",
    "mixture_score",
    "mixture_gumbel",
    "mixture_gumbel_st",
    "mixture_exact",
]


def compose_cfg(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides)


def parameter_groups(model: MixtureVAE) -> dict[str, torch.Tensor]:
    """Boolean masks over the flattened parameters (in ``model.parameters()`` order), one per group."""
    k, d = model.components, model.latent_dim
    head = model.encoder[-1]  # Linear(H, K + 2 K D): rows [0, K) logits, [K, K + K D) loc, the rest scale
    rows = torch.arange(head.out_features)  # [O]
    row_group = {"logits": rows < k, "loc": (rows >= k) & (rows < k + k * d), "scale": rows >= k + k * d}
    enc = {id(p) for p in model.encoder.parameters()}
    dec = {id(p) for p in model.decoder.parameters()}
    masks: dict[str, list[torch.Tensor]] = {
        g: [] for g in ["logits", "loc", "scale", "encoder", "decoder", "all"]
    }
    for p in model.parameters():
        n = p.numel()
        for g in ["logits", "loc", "scale"]:
            if p is head.weight:
                masks[g].append(row_group[g].unsqueeze(1).expand_as(p).reshape(-1))  # [O * H]
            elif p is head.bias:
                masks[g].append(row_group[g])  # [O]
            else:
                masks[g].append(torch.zeros(n, dtype=torch.bool))
        masks["encoder"].append(torch.full((n,), id(p) in enc))
        masks["decoder"].append(torch.full((n,), id(p) in dec))
        masks["all"].append(torch.ones(n, dtype=torch.bool))
    return {g: torch.cat(m) for g, m in masks.items()}


def group_variance(
    model: MixtureVAE, estimator, x: torch.Tensor, n_draws: int, seed: int = 0
) -> dict[str, float]:
    """Mean per-parameter variance of ``n_draws`` gradient estimates, per parameter group; and seconds per draw."""
    params = list(model.parameters())
    masks = parameter_groups(model)
    estimator.update_state = False  # moving averages frozen: every draw sees the same estimator
    total = total_sq = None
    tick = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(n_draws):
            est = estimator(model.cost_fn(x), model.context(x))
            grads = torch.autograd.grad(est.surrogate, params, allow_unused=True)
            g = torch.cat(
                [(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(grads, params)]
            ).double()  # [P]
            total = g if total is None else total + g
            total_sq = g * g if total_sq is None else total_sq + g * g
    seconds = (time.perf_counter() - tick) / n_draws
    estimator.update_state = True
    mean = total / n_draws  # [P]
    var = (total_sq / n_draws - mean * mean).clamp_min(0) * n_draws / (n_draws - 1)  # [P]
    out = {g: var[m].mean().item() for g, m in masks.items()}
    out["seconds"] = seconds
    return out


def warm_up_baseline(estimator, model, x: torch.Tensor, steps: int = 20) -> None:
    """Let moving-average baselines see the cost level at these parameters before their variance is measured
    (a baseline at its initial 0 would be a straw man); no parameter changes."""
    if not any(b.numel() for b in estimator.buffers() if b is not estimator.step):
        return
    with torch.no_grad():
        for _ in range(steps):
            estimator(model.cost_fn(x), model.context(x))


def variance_table(model: MixtureVAE, x: torch.Tensor, n_draws: int, title: str) -> list[dict]:
    rows = []
    for name in ESTIMATORS:
        cfg = compose_cfg([f"estimator={name}"]).estimator
        estimator = instantiate(cfg, context_dim=model.context_dim)
        warm_up_baseline(estimator, model, x)
        stats = group_variance(model, estimator, x, n_draws)
        rows.append({"estimator": name, **stats})
    groups = ["logits", "loc", "scale", "encoder", "decoder", "all"]
    print(f"\n{title}: log10 mean per-parameter gradient variance, M = {n_draws} draws, B = {x.shape[0]}")
    print(f"{'estimator':<18}" + "".join(f"{g:>10}" for g in groups) + f"{'s/draw':>9}")
    for r in rows:
        print(
            f"{r['estimator']:<18}"
            + "".join(f"{math.log10(r[g]) if r[g] > 0 else float('-inf'):>10.3f}" for g in groups)
            + f"{r['seconds']:>9.3f}"
        )
    return rows


def fmt(v: float, digits: int = 2) -> str:
    """Fixed point for ordinary values; diverged runs (|v| >= 1e5, nan) in short scientific notation."""
    return f"{v:.{digits}f}" if math.isfinite(v) and abs(v) < 1e5 else f"{v:.3g}"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def svi_table(estimators: list[str], steps: int, out: Path) -> dict:
    """KL(q || p) after ``steps`` of SVI per estimator, on the ring and the 10-D Gaussian-mixture presets."""
    table: dict = {}
    for preset in ["mixture_svi_ring", "mixture_svi_gmm10"]:
        for name in estimators:
            run_dir = out / preset / name
            cfg = compose_cfg(
                [
                    f"experiment={preset}",
                    f"estimator={name}",
                    "device=cpu",
                    f"train.steps={steps}",
                    f"train.eval_every={steps}",
                    f"train.log_every={max(1, steps // 10)}",
                    "data.n_eval=200",
                    "eval.samples=100",
                    "variance.every=0",
                    "logger.mode=disabled",
                    "quiet=true",
                ]
            )
            tick = time.perf_counter()
            try:
                train(cfg, run_dir)
            except FloatingPointError as e:  # the soft Gumbel relaxation can drive log q(z) to -inf
                print(f"{preset} / {name}: diverged ({e})")
                table.setdefault(preset, {})[name] = {"kl": float("nan"), "diverged": str(e)}
                continue
            model = instantiate(cfg.model, x_dim=1, train_mean=torch.zeros(1))
            model.load_state_dict(
                torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
            )
            torch.manual_seed(0)
            kl = model.kl_to_target(20000)
            if model.latent_dim == 2:
                model.plot(out / preset / f"fit_{name}.png")
            table.setdefault(preset, {})[name] = {
                "kl": kl,
                "wall_s": time.perf_counter() - tick,
                "weights": torch.softmax(model.logits, -1).tolist(),
            }
    print(f"\nSVI, {steps} steps, batch 100, Adam lr 1e-2, seed 1: KL(q || p) in nats (20k samples of q)")
    print(f"{'estimator':<18}" + "".join(f"{p:>20}" for p in table))
    for name in estimators:
        print(f"{name:<18}" + "".join(f"{fmt(table[p][name]['kl'], 4):>20}" for p in table))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="/work/shared/data")
    ap.add_argument("--steps", type=int, default=500, help="training steps per estimator (0: variance only)")
    ap.add_argument(
        "--draws", type=int, default=50, help="M gradient estimates per variance measurement (0: skip)"
    )
    ap.add_argument("--batch", type=int, default=100, help="minibatch of the variance measurement")
    ap.add_argument("--eval-examples", type=int, default=1000, help="validation / test examples evaluated")
    ap.add_argument("--eval-samples", type=int, default=100, help="m of the final importance-weighted bound")
    ap.add_argument(
        "--svi-steps", type=int, default=0, help="SVI training steps per estimator and target (0: skip)"
    )
    ap.add_argument("--out", default=None, help="folder for the run directories and results.json")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    args = ap.parse_args()
    estimators = args.estimators.split(",")
    ESTIMATORS[:] = estimators
    out = Path(
        args.out or ROOT / "outputs" / "bench" / f"mixture_estimators_{datetime.now():%Y-%m-%d_%H-%M-%S}"
    )
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args)}

    base = compose_cfg(["experiment=mixture_vae", f"data.root={args.data_root}", "device=cpu"])
    data = instantiate(base.data, device="cpu")
    x = data.split("train").sample_batch(args.batch, torch.Generator().manual_seed(1234))  # [B, X]
    torch.manual_seed(0)
    model = instantiate(base.model, x_dim=data.x_dim, train_mean=data.train_mean)
    print(f"model: {base.model.name} K={model.components} D={model.latent_dim}; data {data}")
    if args.draws > 1:
        results["variance_init"] = variance_table(model, x, args.draws, "at initialisation (seed 0)")

    if args.steps > 0:
        n_log = max(1, args.steps // 10)
        curves = {}
        for name in estimators:
            run_dir = out / name
            cfg = compose_cfg(
                [
                    "experiment=mixture_vae",
                    f"estimator={name}",
                    f"data.root={args.data_root}",
                    "device=cpu",
                    f"train.steps={args.steps}",
                    f"train.eval_every={max(1, args.steps // 5)}",
                    f"train.log_every={n_log}",
                    f"train.val_examples={args.eval_examples}",
                    f"eval.test_examples={args.eval_examples}",
                    f"eval.samples={args.eval_samples}",
                    "variance.every=0",
                    "logger.mode=disabled",
                    "quiet=true",
                ]
            )
            tick = time.perf_counter()
            summary = train(cfg, run_dir)
            curves[name] = {
                "summary": summary,
                "metrics": read_metrics(run_dir),
                "wall_s": time.perf_counter() - tick,
            }
        results["training"] = {k: {"summary": v["summary"], "wall_s": v["wall_s"]} for k, v in curves.items()}

        print(
            f"\nmixture VAE training, {args.steps} steps, batch 100, Adam lr {base.optim.lr}; "
            f"ELBO in nats (train: one minibatch; val/test: first {args.eval_examples} examples)"
        )
        log_steps = sorted({m["step"] for m in curves[estimators[0]]["metrics"] if "train/elbo" in m})
        shown = log_steps[:: max(1, len(log_steps) // 5)] + ([log_steps[-1]] if log_steps else [])
        shown = sorted(set(shown))
        header = f"{'estimator':<18}" + "".join(f"{'tr@' + str(s):>10}" for s in shown)
        header += f"{'val':>10}{'test':>10}{'bound_' + str(args.eval_samples):>11}{'s/step':>8}"
        print(header)
        for name, c in curves.items():
            tr = {m["step"]: m["train/elbo"] for m in c["metrics"] if "train/elbo" in m}
            s = c["summary"]
            line = f"{name:<18}" + "".join(f"{fmt(tr.get(st, float('nan'))):>10}" for st in shown)
            line += f"{fmt(s['val/elbo']):>10}{fmt(s['test/elbo']):>10}{fmt(s[f'test/bound_{args.eval_samples}']):>11}"
            line += f"{s['train_seconds'] / args.steps:>8.3f}"
            print(line)

    if args.steps > 0 and args.draws > 1:
        ref = out / estimators[0] / "checkpoint.pt"
        state = torch.load(ref, map_location="cpu", weights_only=False)["model"]
        model.load_state_dict(state)
        results["variance_trained"] = variance_table(
            model, x, args.draws, f"after {args.steps} steps of {estimators[0]} (same parameters for all)"
        )

    if args.svi_steps > 0:
        results["svi"] = svi_table(estimators, args.svi_steps, out)

    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
