"""REBAR, RELAX, VIMCO and MuProp rollout next to the existing estimators: step time and gradient variance.

(a) step time on SBN 200-200-784 (linear), relative to ST: one step = estimator forward + backward of the
    surrogate + an Adam step over the model's and the estimator's parameters, B = 100, real binarized-MNIST
    batches, the model built exactly as the runner builds it (decoder bias at the logit of the training mean).
    Interleaved rounds (each round times one step of every estimator in turn, so load from other processes hits
    all alike); median over rounds after warm-up rounds.
(b) log10 gradient variance at initialisation (runners/variance.py ``gradient_variance``: M estimates on one fixed
    training minibatch of 100, per-parameter variance averaged over all parameters and over the recognition
    network) on SBN 200-784 and 200-200-784. Estimators with running state or own parameters (C, IDB, REBAR's
    tau and eta, RELAX's net, the rollout's baseline) first get ``--state-warmup`` steps at the fixed model
    that update only their own state (Adam, lr ``--state-lr``), as bench/paper_measurements.py does.
    VIMCO's row is the variance of *its* gradient (the K-sample bound, K = 5 samples per estimate): not the
    same target as the others.

    .venv/bin/python bench/bench_post_muprop.py [--parts time variance] [--rounds 10] [--draws 50]

Prints markdown tables and writes them to ``bench/results/post_muprop.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from runners.variance import gradient_variance  # noqa: E402

CONF = ROOT / "conf"
DEFAULT = ["st", "nvil", "muprop_c", "arm", "disarm", "rebar", "relax", "vimco", "muprop_rollout"]


def build_model(layers: list[int], data_root: str, seed: int):
    """The runner's SBN (linear) and the training split, from the composed config."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            "config",
            overrides=[
                "model=sbn",
                f"model.layers=[{','.join(map(str, layers))}]",
                f"data.root={data_root}",
                "data.download=false",
                "data.verify=false",
            ],
        )
    data = instantiate(cfg.data, device="cpu")
    torch.manual_seed(seed)
    model = instantiate(cfg.model, x_dim=data.x_dim, train_mean=data.train_mean)
    return model, data.split("train")


def make_estimator(name: str, context_dim: int):
    return instantiate(OmegaConf.load(CONF / "estimator" / f"{name}.yaml"), context_dim=context_dim)


def has_state(name: str, est) -> bool:
    cfg = OmegaConf.load(CONF / "estimator" / f"{name}.yaml")
    return any(bool(cfg.get(k, False)) for k in ("centre", "normalise", "idb")) or any(
        True for _ in est.parameters()
    )


def warm_up(model, est, split, steps: int, lr: float) -> None:
    """Update only the estimator's own state (moving averages, nets, tau / eta) at the fixed model."""
    params = [p for p in est.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if params else None
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = split.sample_batch(100, gen)  # [B, X]
        out = est(model.cost_fn(x), model.context(x))
        if opt is not None:
            grads = torch.autograd.grad(out.surrogate, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()


def step_times(args, names: list[str]) -> str:
    model0, split = build_model([200, 200], args.data_root, args.seed)
    gen = torch.Generator().manual_seed(3)
    batches = [split.sample_batch(100, gen) for _ in range(8)]  # [B, X] each, reused round-robin
    runs = {}
    for name in names:
        model = copy.deepcopy(model0)
        est = make_estimator(name, model.context_dim)
        opt = torch.optim.Adam([*model.parameters(), *est.parameters()], lr=3e-4)
        runs[name] = (model, est, opt)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup_rounds + args.rounds):
        x = batches[r % len(batches)]
        for name in names:
            model, est, opt = runs[name]
            t0 = time.perf_counter()
            out = est(model.cost_fn(x), model.context(x))
            opt.zero_grad(set_to_none=True)
            out.surrogate.backward()
            opt.step()
            est.step += 1
            if r >= args.warmup_rounds:
                times[name].append(time.perf_counter() - t0)
    st = statistics.median(times["st"])
    lines = [
        f"Step time, SBN 200-200-784 (linear), B = 100, Adam, 1 thread, median of {args.rounds} interleaved "
        f"rounds after {args.warmup_rounds}:",
        "",
        "| estimator | step ms | x ST | min ms |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        med = statistics.median(times[name])
        lines.append(f"| {name} | {1e3 * med:.1f} | {med / st:.2f} | {1e3 * min(times[name]):.1f} |")
    return "\n".join(lines)


def variances(args, names: list[str]) -> str:
    rows = {}
    for layers in ([200], [200, 200]):
        model, split = build_model(layers, args.data_root, args.seed)
        x = split.sample_batch(100, torch.Generator().manual_seed(12345))  # [B, X] the fixed minibatch
        key = "-".join(map(str, layers)) + "-784"
        for name in names:
            torch.manual_seed(args.seed)
            est = make_estimator(name, model.context_dim)
            warmed = 0
            if has_state(name, est):
                warm_up(model, est, split, args.state_warmup, args.state_lr)
                warmed = args.state_warmup
            t0 = time.perf_counter()
            stats = gradient_variance(model, est, x, n_draws=args.draws, seed=args.seed)
            rows.setdefault(name, {})[key] = (stats["log10_var"], stats["log10_var_rec"], warmed)
            print(f"  {key} {name}: {stats['log10_var']:.2f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    keys = ["200-784", "200-200-784"]
    lines = [
        f"log10 gradient variance at initialisation (M = {args.draws} estimates, one fixed minibatch of 100 "
        f"real training images; stateful estimators warmed up for {args.state_warmup} steps at the fixed "
        "model; all parameters / recognition network only):",
        "",
        "| estimator | " + " | ".join(f"{k} all | {k} rec" for k in keys) + " |",
        "|---|" + "---:|" * (2 * len(keys)),
    ]
    for name in names:
        cells = [f"{rows[name][k][0]:.2f} | {rows[name][k][1]:.2f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="*", default=["time", "variance"], choices=["time", "variance"])
    ap.add_argument("--only", nargs="*", default=None, help="estimator names (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup-rounds", type=int, default=2)
    ap.add_argument("--draws", type=int, default=50, help="M gradient estimates per variance measurement")
    ap.add_argument("--state-warmup", type=int, default=20)
    ap.add_argument("--state-lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--data-root", default=os.environ.get("DATA_ROOT", str(Path.home() / ".cache/gradest/data"))
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.only or DEFAULT
    if "st" not in names:
        names = ["st", *names]
    out = []
    if "time" in args.parts:
        out.append(step_times(args, names))
        print(out[-1], flush=True)
    if "variance" in args.parts:
        out.append(variances(args, names))
        print(out[-1], flush=True)
    path = ROOT / "bench" / "results" / "post_muprop.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"`{' '.join(sys.argv)}`\n\n" + "\n\n".join(out) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
