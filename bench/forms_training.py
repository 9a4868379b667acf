"""Short training runs: the multi-layer fixes of MuProp and 1/2 against the old forms (issue 9, part 1).

On the structured-prediction model 392-200-200-392 (models/sbn_sp.py, real binarized MNIST) the old forms gave
h1 no Taylor information: MuProp's partial derivative f'(z_bar_1) is zero there (h1's control variate is the
constant f(z_bar)), and 1/2's partial f'_1(z) is zero too, so h1 got exactly no gradient from 1/2. This script
trains the model from the same initialisation and seed with

    muprop_c          MuProp-C, total derivative (estimators/muprop.py, the paper's Algorithm 1)
    muprop_c_partial  MuProp-C, partial derivative (the old form; ``MeanField(total=False)``)
    darn              1/2, f'_i through the conditional means of the layers above (estimators/darn.py)
    darn_partial      1/2, partial f'_i (the old form: layers above held fixed)

for ``--steps`` Adam steps (lr ``--lr``, batch 100; Adam rather than the paper's SGD so that a short run moves),
then reports the test NLL with m = 100 (the paper's metric, -log (1/m) sum_i p(y | h_i)) on the first
``--test-examples`` test examples and the mean |gradient| of h1's parameters over the last 100 steps.

    .venv/bin/python bench/forms_training.py       # about 3 min on 2 shared busy cores
Writes bench/results/forms_training_seed<seed>.json and .md (one run per seed: ``--seed 1``, ``--seed 2``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from data.binarized_mnist import BinarizedMNIST  # noqa: E402
from estimators.base import Trace  # noqa: E402
from estimators.darn import Darn  # noqa: E402
from estimators.muprop import MuProp  # noqa: E402
from models.sbn_sp import SBNSP  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from muprop_forms import PartialMuProp  # noqa: E402  - the partial form, defined once

RESULTS = ROOT / "bench" / "results"


class PartialDarn(Darn):
    """1/2 with the partial f'_i (the layers above held fixed): the old form."""

    def f_primes(self, cost: Tensor, trace: Trace, es: list[Tensor]) -> list[Tensor]:
        direct = torch.autograd.grad(cost.sum(), es, retain_graph=True, allow_unused=True)
        return [g if g is not None else torch.zeros_like(e) for g, e in zip(direct, es)]


def make(name: str, context_dim: int):
    return {
        "muprop_c": lambda: MuProp(centre=True, context_dim=context_dim),
        "muprop_c_partial": lambda: PartialMuProp(centre=True, context_dim=context_dim),
        "darn": lambda: Darn(context_dim=context_dim),
        "darn_partial": lambda: PartialDarn(context_dim=context_dim),
    }[name]()


def run(name: str, data, train_mean: Tensor, args) -> dict:
    torch.manual_seed(args.seed)
    model = SBNSP(784, [200, 200], train_mean=train_mean)
    est = make(name, model.context_dim)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    split = data.split("train")
    h1 = list(model.hidden_layers[0].parameters())
    g_h1, start = 0.0, time.time()
    for step in range(args.steps):
        x = split.sample_batch(100)  # [B, X]
        opt.zero_grad()
        est(model.cost_fn(x), model.context(x)).surrogate.backward()
        if step >= args.steps - 100:
            g_h1 += sum(float(p.grad.abs().mean()) for p in h1) / len(h1) / 100
        opt.step()
    x_test = data.split("test").data[: args.test_examples].float()  # [N, X]
    torch.manual_seed(args.seed + 1)
    nll = -float(torch.cat([model.bound(xb, 100) for xb in x_test.split(100)]).mean())
    return {"test_nll_m100": nll, "mean_abs_grad_h1_last100": g_h1, "train_s": time.time() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("DATA_ROOT", ""))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test-examples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    data = BinarizedMNIST(args.data_root, download=False, verify=False)
    train_mean = data.split("train").data.float().mean(0)  # [X]
    results = {}
    for name in ("muprop_c", "muprop_c_partial", "darn", "darn_partial"):
        results[name] = run(name, data, train_mean, args)
        print(name, results[name], flush=True)
    lines = [
        "# 392-200-200-392: the multi-layer forms of MuProp-C and 1/2 against the old ones (short training)",
        "",
        f"Command: `.venv/bin/python bench/forms_training.py --steps {args.steps} --lr {args.lr} "
        f"--test-examples {args.test_examples} --seed {args.seed}`; Adam, batch 100, one seed; test NLL with m = 100 "
        f"on the first {args.test_examples} test examples (nats, lower is better).",
        "",
        "| estimator | test NLL (m=100) | mean abs grad h1 (last 100 steps) | train s |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['test_nll_m100']:.2f} | {r['mean_abs_grad_h1_last100']:.3g} | {r['train_s']:.0f} |"
        )
    lines.append(f"\nWall time {time.time() - start:.0f} s, torch threads 1.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"forms_training_seed{args.seed}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
