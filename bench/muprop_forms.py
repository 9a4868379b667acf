"""Gradient variance of MuProp's two derivative forms on the paper's multi-layer models (issue 9, part 1).

MuProp's control variate is the first-order Taylor expansion of f around the mean-field point; its slope
f'(z_bar_i) is either the **total** derivative through the mean-field network (the paper's Algorithm 1, the
default and only form of estimators/muprop.py) or the **partial** derivative with the layers above held
fixed (``PartialMuProp`` below, ``MeanField(total=False)``). Both are unbiased; this script measures which
has the lower variance, per stochastic layer's recognition parameters.

Models, with real binarized MNIST (``--data-root``, default ``$DATA_ROOT``):
    sp   392-200-200-392 structured prediction (models/sbn_sp.py): parameter groups h1 (x_u -> h1), h2 (h1 -> h2),
         out (h2 -> y, pathwise for every estimator)
    sbn  SBN 200-200-784 (models/sbn.py): groups rec1 (x -> z1), rec2 (z1 -> z2), gen (decoder and prior)

At two parameter points each: initialisation, and after ``--train-steps`` Adam steps (lr 1e-3, batch 100) with
MuProp-C (total form) from the same initialisation. At each point, on one fixed training minibatch of 100, M =
``--draws`` gradient estimates per estimator (``runners/variance.py gradient_moments``: the estimator's state
is left as it is and the RNG forked), per-parameter variance averaged over each group. Estimators: plain
MuProp (the control variate alone) and MuProp-C with its moving average warmed by ``--warmup`` estimates at
the same point (so the centring constant is not its initial zero), in both forms; and 1/2 (DARN, biased),
whose f' now reaches h1 of the SP model through the conditional mean of h2 (|mean| of its h1 gradient > 0).

    .venv/bin/python bench/muprop_forms.py               # 214 s measured on 2 shared busy cores
Writes bench/results/muprop_forms.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data.binarized_mnist import BinarizedMNIST  # noqa: E402
from estimators.darn import Darn  # noqa: E402
from estimators.muprop import MeanField, MuProp  # noqa: E402
from models.sbn import SBN  # noqa: E402
from models.sbn_sp import SBNSP  # noqa: E402
from runners.variance import gradient_moments  # noqa: E402

RESULTS = ROOT / "bench" / "results"


class PartialMuProp(MuProp):
    """MuProp with the partial derivative f'(z_bar_i) (the layers above held fixed): the comparison form."""

    def mean_field_sampler(self) -> MeanField:
        return MeanField(total=False)


def groups_of(model: torch.nn.Module, kind: str) -> dict[str, list[str]]:
    """Parameter-name prefixes of each reported group."""
    if kind == "sp":
        return {"h1": ["hidden_layers.0."], "h2": ["hidden_layers.1."], "out": ["output."]}
    return {"rec1": ["encoder.0."], "rec2": ["encoder.1."], "gen": ["decoder.", "prior_logits"]}


def group_masks(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    for g, prefixes in groups_of(model, kind).items():
        out[g] = torch.cat(
            [
                torch.full((p.numel(),), any(n.startswith(x) for x in prefixes), dtype=torch.bool)
                for n, p in named
            ]
        )  # [P]
    return out


def build(kind: str, train_mean: torch.Tensor) -> torch.nn.Module:
    if kind == "sp":
        return SBNSP(784, [200, 200], train_mean=train_mean)
    return SBN(784, [200, 200], train_mean=train_mean)


def estimators(context_dim: int) -> dict[str, torch.nn.Module]:
    out = {"darn": Darn(context_dim=context_dim)}  # 1/2, f' through the conditional means above (biased)
    for form in ("total", "partial"):
        cls = MuProp if form == "total" else PartialMuProp
        out[f"muprop/{form}"] = cls(context_dim=context_dim)
        out[f"muprop_c/{form}"] = cls(centre=True, context_dim=context_dim)
    return out


def measure(model, kind, x, draws, warmup, seed) -> dict[str, dict[str, float]]:
    masks = group_masks(model, kind)
    out = {}
    for name, est in estimators(model.context_dim).items():
        if getattr(
            getattr(est, "signal", None), "centre", False
        ):  # warm the moving average at this point (it only reads the residuals)
            torch.manual_seed(seed + 1)
            for _ in range(warmup):
                est(model.cost_fn(x), model.context(x))
        mean, var = gradient_moments(model, est, x, draws, seed=seed)  # [P]
        out[name] = {g: float(var[m].mean()) for g, m in masks.items()}
        out[name].update({f"|mean| {g}": float(mean[m].abs().mean()) for g, m in masks.items()})
    return out


def train_steps(model, data, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    est = MuProp(centre=True, context_dim=model.context_dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    split = data.split("train")
    for _ in range(steps):
        x = split.sample_batch(100)
        opt.zero_grad()
        est(model.cost_fn(x), model.context(x)).surrogate.backward()
        opt.step()


def markdown(results: dict, args) -> str:
    lines = [
        "# MuProp: total vs partial derivative in the Taylor control variate (gradient variance)",
        "",
        f"Command: `.venv/bin/python bench/muprop_forms.py --draws {args.draws} --warmup {args.warmup} "
        f"--train-steps {args.train_steps}`; real binarized MNIST, one fixed training minibatch of 100, "
        f"M = {args.draws} estimates, mean per-parameter variance of each group (log10). "
        "ratio = var(partial) / var(total): > 1 means the paper's total derivative has the lower variance.",
        "",
    ]
    for key, res in results.items():
        if key == "meta":
            continue
        groups = [g for g in next(iter(res["variance"].values())) if not g.startswith("|mean|")]
        lines += [f"## {res['title']} ({res['point']})", ""]
        lines.append("| estimator | " + " | ".join(f"log10 var {g}" for g in groups) + " |")
        lines.append("|---|" + "---|" * len(groups))
        for name, v in res["variance"].items():
            lines.append(f"| {name} | " + " | ".join(f"{math.log10(v[g]):.3f}" for g in groups) + " |")
        d = res["variance"]["darn"]
        lines.append(
            "| 1/2: mean abs gradient | " + " | ".join(f"{d['|mean| ' + g]:.3g}" for g in groups) + " |"
        )
        for base in ("muprop", "muprop_c"):
            t, p = res["variance"][f"{base}/total"], res["variance"][f"{base}/partial"]
            lines.append(f"| ratio {base} | " + " | ".join(f"{p[g] / t[g]:.3g}" for g in groups) + " |")
        lines.append("")
    lines.append(f"Wall time {results['meta']['wall_s']:.0f} s, torch threads 1.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("DATA_ROOT", ""))
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    data = BinarizedMNIST(args.data_root, download=False, verify=False)
    train_mean = data.split("train").data.float().mean(0)  # [X]
    x = data.split("train").data[:100].float()  # [B, X], the first training minibatch
    results = {}
    titles = {"sp": "392-200-200-392 structured prediction", "sbn": "SBN 200-200-784"}
    for kind in ("sp", "sbn"):
        torch.manual_seed(args.seed)
        model = build(kind, train_mean)
        for point in ("init", f"after {args.train_steps} MuProp-C steps"):
            if point != "init":
                train_steps(model, data, args.train_steps, args.seed)
            res = measure(model, kind, x, args.draws, args.warmup, args.seed)
            results[f"{kind}/{point}"] = {"title": titles[kind], "point": point, "variance": res}
            print(kind, point, json.dumps(res, indent=1), flush=True)
    results["meta"] = {"wall_s": time.time() - start, "args": vars(args)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "muprop_forms.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "muprop_forms.md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
