"""Step time of every Bernoulli estimator on the paper's SBN 200-200-784 (linear), relative to ST.

One step = estimator forward + backward of the surrogate + optimiser step (SGD, momentum 0.9), B = 100,
a random binary batch of 784 pixels (no data needed). Estimators are found by glob over
conf/estimator/*.yaml (those that support Bernoulli latents). Timing is interleaved: each round times one
step of every estimator in turn, so load from other processes hits all of them alike; the table reports the
median over rounds after warm-up. Also timed: one gradient-variance measurement (runners/variance.py,
M = 100 draws) per estimator.

    .venv/bin/python bench/bench_estimators.py [--rounds 15] [--warmup 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from models.sbn import SBN  # noqa: E402
from runners.variance import gradient_variance  # noqa: E402

CONF = ROOT / "conf" / "estimator"


def bernoulli_estimators() -> list[str]:
    out = []
    for p in sorted(CONF.glob("*.yaml")):
        cls = instantiate(OmegaConf.load(p), _partial_=True).func
        if "bernoulli" in cls.supports:
            out.append(p.stem)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--variance-draws", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="estimator names (default: every Bernoulli one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = (torch.rand(args.batch, 784) < 0.3).float().to(device)  # [B, X]
    base_model = SBN(784, [200, 200]).to(device)
    names = args.only or bernoulli_estimators()
    if "st" not in names:
        names = ["st", *names]

    runs = {}
    for name in names:
        model = copy.deepcopy(base_model)
        est = instantiate(OmegaConf.load(CONF / f"{name}.yaml"), context_dim=model.context_dim).to(device)
        opt = torch.optim.SGD([*model.parameters(), *est.parameters()], lr=1e-4, momentum=0.9)
        runs[name] = (model, est, opt)

    def step(name: str) -> float:
        model, est, opt = runs[name]
        sync(device)
        t0 = time.perf_counter()
        out = est(model.cost_fn(x), model.context(x))
        opt.zero_grad(set_to_none=True)
        out.surrogate.backward()
        opt.step()
        est.step += 1
        sync(device)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        for name in names:
            t = step(name)
            if r >= args.warmup:
                times[name].append(t)

    var_time, var_log = {}, {}
    for name in names:
        model, est, _ = runs[name]
        sync(device)
        t0 = time.perf_counter()
        stats = gradient_variance(model, est, x, n_draws=args.variance_draws, seed=0)
        sync(device)
        var_time[name] = time.perf_counter() - t0
        var_log[name] = stats["log10_var"]

    st = statistics.median(times["st"])
    print(
        f"SBN 200-200-784 (linear), B={args.batch}, device={device}, threads={args.threads}, "
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up"
    )
    print(
        f"{'estimator':<18}{'step ms':>10}{'x ST':>8}{'min ms':>10}{'var(M=' + str(args.variance_draws) + ') s':>14}"
        f"{'log10 var':>11}"
    )
    for name in names:
        med = statistics.median(times[name])
        print(
            f"{name:<18}{1e3 * med:>10.2f}{med / st:>8.2f}{1e3 * min(times[name]):>10.2f}{var_time[name]:>14.2f}"
            f"{var_log[name]:>11.2f}"
        )


if __name__ == "__main__":
    main()
