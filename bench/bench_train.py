"""Training throughput of every (model, estimator) pair, and the time of one gradient-variance measurement.

    python bench/bench_train.py [--steps 20] [--models sbn vae] [--device cpu cuda]

One training step = estimator forward + backward + Adam step on a random binary minibatch of 100 images
(784 pixels; no data files needed). Ratios are relative to the first estimator in the same run and model,
measured in one process. CUDA is measured when present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from runners.checks import CONF_DIR, available, target_class  # noqa: E402
from runners.variance import gradient_variance  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(model, estimator, x, steps: int, device) -> float:
    opt = torch.optim.Adam([*model.parameters(), *estimator.parameters()], lr=1e-4)
    times = []
    for i in range(steps + 3):
        sync(device)
        t = time.perf_counter()
        est = estimator(model.cost_fn(x), model.context(x))
        opt.zero_grad(set_to_none=True)
        est.surrogate.backward()
        opt.step()
        sync(device)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--models", nargs="*", default=None, help="conf/model names (default: all)")
    p.add_argument(
        "--estimators", nargs="*", default=None, help="conf/estimator names (default: all compatible)"
    )
    p.add_argument("--variance-samples", type=int, default=100)
    p.add_argument("--device", nargs="*", default=None)
    args = p.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, devices {devices}")
    for dev_name in devices:
        device = torch.device(dev_name)
        for model_name in args.models or available("model"):
            mcfg = OmegaConf.load(CONF_DIR / "model" / f"{model_name}.yaml")
            kind = target_class(mcfg, model_name).latent_kind
            names = [
                n
                for n in (args.estimators or available("estimator"))
                if kind in target_class(OmegaConf.load(CONF_DIR / "estimator" / f"{n}.yaml"), n).supports
            ]
            if not names:
                continue
            torch.manual_seed(0)
            x_dim = 784 if model_name != "mixture_svi" else 1
            x = torch.bernoulli(torch.full((100, x_dim), 0.13, device=device))  # [B, X]
            print(f"\n== {model_name} ({kind} latents) on {device}, batch 100")
            print(
                f"{'estimator':<18}{'ms/step':>10}{'steps/s':>10}{'ratio':>8}{'variance M=' + str(args.variance_samples) + ' (s)':>22}"
            )
            base = None
            for name in names:
                model = instantiate(mcfg, x_dim=x_dim, train_mean=x.mean(0)).to(device)
                est = instantiate(
                    OmegaConf.load(CONF_DIR / "estimator" / f"{name}.yaml"), context_dim=model.context_dim
                ).to(device)
                t = step_time(model, est, x, args.steps, device)
                base = base or t
                sync(device)
                t0 = time.perf_counter()
                gradient_variance(model, est, x, args.variance_samples)
                sync(device)
                tv = time.perf_counter() - t0
                print(f"{name:<18}{1e3 * t:>10.2f}{1 / t:>10.1f}{t / base:>8.2f}{tv:>22.2f}")


if __name__ == "__main__":
    main()
