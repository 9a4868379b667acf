"""MuProp paper measurements on real binarized MNIST, sized for a small CPU budget (a script, not a test).

For two of the paper's models, SBN 200-784 (Table 3, generative) and 392-200-200-392 (Table 2, structured
output prediction):

(a) gradient variance (REFERENCE.md Sec. 4; ``runners/variance.py`` ``gradient_variance``): M estimates on
    one fixed training minibatch of 100, per-parameter variance averaged over the recognition parameters
    (the SBN's encoder; the SP model's stochastic layers), log10, and the mean SNR |mean|/std, for every
    estimator in conf/estimator that can serve Bernoulli latents, all at the same parameters: at
    initialisation and after the short MuProp-C training of part (b). Estimators with running state (C, VN,
    IDB) first get ``--warmup`` steps at those fixed parameters that update only their own state (moving
    averages, and the IDB net with Adam, lr ``--warmup-lr``), so that their baselines are not measured at
    their untrained initial values;
(b) a short training run of every estimator of the paper's tables (LR-C-VN-IDB = nvil, MuProp-C,
    MuProp-C-VN for Table 2 / MuProp-C-IDB for Table 3, ST, 1/2 = darn), one seed, through the project's own
    runner (``runners.train.train``) with the paper presets and Adam: the paper's long SGD runs (length not
    stated, lr picked per method from a grid) do not fit the budget. Test metrics on the full test set:
    Table 2, the NLL with m = 100 (-test/bound_100); Table 3, the negative ELBO (the paper's metric) and the
    negative importance-weighted bound with ``--sbn-bound-samples`` samples (1000 in the presets; 100 by
    default here for time) on the first ``--bound-examples`` test examples, with the ELBO of the same examples
    (the test file is not shuffled: its first 1000 examples are harder than the average). Then the ordering of
    the estimators next to the paper's.

Writes ``bench/results/paper_measurements.json`` and ``.md`` (and the run directories under
``bench/results/paper_measurements/``) and prints the tables. Usage:

    .venv/bin/python bench/paper_measurements.py          # ~20 min wall with 2 workers on 2 shared, busy cores
    .venv/bin/python bench/paper_measurements.py --quick  # a smoke check of the script (20 steps, M = 5)

Defaults (600 training steps, M = 20, 20 warm-up steps, IW bound of the SBN on the first 1000 test examples) are
sized so that the whole script finishes within 25 minutes while other jobs share the two cores (measured: 20
minutes at a load average of 6-9); raise ``--steps``/``--draws`` on a free machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from runners.train import CHECKPOINT, build, evaluate, train  # noqa: E402
from runners.utils import git_revision  # noqa: E402
from runners.variance import gradient_variance  # noqa: E402

CONF = ROOT / "conf"
RESULTS = ROOT / "bench" / "results"

# The paper's estimators first (the order of its tables), then the LR variants and later estimators.
PAPER_VARIANCE_ORDER = [
    "reinforce",
    "reinforce_ma",
    "nvil",
    "muprop",
    "muprop_c",
    "muprop_c_vn",
    "muprop_c_idb",
    "st",
    "darn",
]

SETUPS = {
    "sbn_200_784": {
        "preset": "muprop_table3_sbn_1layer",
        "title": "SBN 200-784 (Table 3, generative; metric: test -ELBO)",
        "train": ["nvil", "muprop_c", "muprop_c_idb", "st", "darn"],
        "paper": {"nvil": 113.5, "muprop_c": 113.6, "muprop_c_idb": 113.1, "st": 129.4, "darn": 112.4},
    },
    "sp_392_200_200_392": {
        "preset": "muprop_table2_mnist_2layer",
        "title": "SP 392-200-200-392 (Table 2, structured prediction; metric: test NLL, m = 100)",
        "train": ["nvil", "muprop_c", "muprop_c_vn", "st", "darn"],
        "paper": {"nvil": 63.2, "muprop_c": 57.7, "muprop_c_vn": 56.7, "st": 56.1, "darn": 57.2},
    },
}
PAPER_NAME = {
    "nvil": "LR-C-VN-IDB",
    "muprop_c": "MuProp-C",
    "muprop_c_vn": "MuProp-C-VN",
    "muprop_c_idb": "MuProp-C-IDB",
    "st": "ST",
    "darn": "1/2",
}


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides)


def bernoulli_estimators() -> list[str]:
    found = []
    for path in sorted((CONF / "estimator").glob("*.yaml")):
        cls = instantiate(OmegaConf.load(path), _partial_=True).func
        if "bernoulli" in cls.supports:
            found.append(path.stem)
    return [n for n in PAPER_VARIANCE_ORDER if n in found] + [
        n for n in found if n not in PAPER_VARIANCE_ORDER
    ]


def run_overrides(args, setup: dict, estimator: str, steps: int) -> list[str]:
    is_sp = setup["preset"].startswith("muprop_table2")
    m = 100 if is_sp else 1  # SBN: the runner computes the ELBO only; the IW bound is task_iw_bound's
    out = [
        f"experiment={setup['preset']}",
        f"estimator={estimator}",
        f"seed={args.seed}",
        f"optim={args.optim}",
        f"optim.lr={args.lr}",
        f"train.steps={steps}",
        "train.batch_size=100",
        f"train.eval_every={max(steps, 1)}",
        f"train.log_every={max(min(100, steps), 1)}",
        f"train.val_examples={args.val_examples}",
        f"eval.samples={m}",
        "eval.chunk=100",
        "variance.every=0",
        "logger=disabled",
        "quiet=true",
        "device=cpu",
        f"data.root={args.data_root}",
        "data.download=false",
        "data.verify=false",
    ]
    if args.test_examples is not None:
        out.append(f"eval.test_examples={args.test_examples}")
    return out


def needs_warmup(est_cfg, est: torch.nn.Module) -> bool:
    """Estimators with running state that a fresh instance has not learnt yet (C, VN, IDB)."""
    return any(bool(est_cfg.get(k, False)) for k in ("centre", "normalise", "idb")) or any(
        True for _ in est.parameters()
    )


def warm_up(model, est, split, steps: int, lr: float, gen: torch.Generator) -> None:
    """Update only the estimator's own state at the model's fixed parameters."""
    params = [p for p in est.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if params else None
    est.update_state = True
    for _ in range(steps):
        x = split.sample_batch(100, gen)  # [B, X]
        e = est(model.cost_fn(x), model.context(x))
        if opt is not None:
            grads = torch.autograd.grad(e.surrogate, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()


def variance_table(args, model, data, names: list[str], est_step: int) -> dict[str, dict]:
    """Variance statistics of every estimator at the model's current parameters."""
    train_split = data.split("train")
    x = train_split.sample_batch(100, torch.Generator().manual_seed(12345))  # [B, X] the fixed minibatch
    out = {}
    for name in names:
        est_cfg = OmegaConf.load(CONF / "estimator" / f"{name}.yaml")
        torch.manual_seed(args.seed)
        est = instantiate(est_cfg, context_dim=model.context_dim)
        est.step.fill_(est_step)  # schedules (annealed temperature / slope) at the training step
        t0 = time.perf_counter()
        warmed = 0
        if needs_warmup(est_cfg, est):
            warm_up(model, est, train_split, args.warmup, args.warmup_lr, torch.Generator().manual_seed(7))
            warmed = args.warmup
        t1 = time.perf_counter()
        stats = gradient_variance(model, est, x, n_draws=args.draws, seed=args.seed)
        t2 = time.perf_counter()
        stats.update(
            n_samples=est.n_samples,
            warmup_steps=warmed,
            seconds=t2 - t0,
            ms_per_estimate=1000 * (t2 - t1) / args.draws,
            unbiased=bool(getattr(est, "unbiased", True)),
        )
        out[name] = stats
        print(
            f"    {name:16s} log10 var(rec) {stats.get('log10_var_rec', float('nan')):7.3f}  "
            f"snr(rec) {stats.get('snr_rec', float('nan')):.4f}  ({stats['seconds']:.1f} s)",
            flush=True,
        )
    return out


def kendall_tau(a: list[str], b: list[str]) -> float:
    """Kendall's tau between two orderings of the same items."""
    pos_a, pos_b = {k: i for i, k in enumerate(a)}, {k: i for i, k in enumerate(b)}
    items = [k for k in a if k in pos_b]
    conc = disc = 0
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            s = (pos_a[items[i]] - pos_a[items[j]]) * (pos_b[items[i]] - pos_b[items[j]])
            conc += s > 0
            disc += s < 0
    n = conc + disc
    return (conc - disc) / n if n else float("nan")


def fmt(v: float, nd: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def render(results: dict, args) -> str:
    lines = [
        f"# MuProp paper measurements\n\ncommand: `{results['command']}` (git {results.get('git_rev')})\n",
        f"optimiser for the training runs: {args.optim}, lr {args.lr}, batch 100, {args.steps} steps, seed "
        f"{args.seed} (the paper: SGD momentum 0.9, lr from a grid, long runs of unstated length)\n",
        f"gradient variance: M = {args.draws} estimates on one fixed training minibatch of 100; warm-up of "
        f"stateful estimators: {args.warmup} steps (Adam lr {args.warmup_lr} on their own nets). The VN "
        f"estimators (nvil, muprop_c_vn, reinforce_c_vn) divide the score-function gradient by max(1, sqrt(v)), "
        f"so their variance is that of a rescaled gradient; the SNR is scale-free. ms / estimate is wall time "
        f"on a shared machine ({args.workers} workers, {args.threads} thread each). For a parameter whose "
        f"mean gradient is 0, E|mean|/std is about sqrt(2 / (pi M)) = {math.sqrt(2 / (math.pi * args.draws)):.3f}"
        f": SNR values near that are the noise floor of M draws.\n",
    ]
    for key, setup in SETUPS.items():
        r = results["setups"].get(key)
        if not r:
            continue
        lines.append(f"\n## {setup['title']}\n")
        var = r.get("variance", {})
        init, trained = var.get("init", {}), var.get("trained", {})
        if init:
            lines.append(
                f"\n### (a) gradient variance of the recognition parameters, log10 (SNR = mean |mean|/std); "
                f"'trained' = after {r.get('trained_steps', '?')} steps of muprop_c\n"
            )
            lines.append(
                "| estimator | S | unbiased flag | log10 var init | SNR init | log10 var trained | SNR trained "
                "| ms / estimate (trained) |"
            )
            lines.append("|---|---|---|---|---|---|---|---|")
            for name, s in init.items():
                t = trained.get(name, {})
                lines.append(
                    f"| {name} | {s['n_samples']} | {'yes' if s['unbiased'] else 'no'} | "
                    f"{fmt(s.get('log10_var_rec'))} | {fmt(s.get('snr_rec'), 4)} | "
                    f"{fmt(t.get('log10_var_rec'))} | {fmt(t.get('snr_rec'), 4)} | "
                    f"{fmt(t.get('ms_per_estimate', s.get('ms_per_estimate')), 1)} |"
                )
        runs = r.get("train", {})
        if runs:
            is_sp = key.startswith("sp")
            m = 100 if is_sp else args.sbn_bound_samples
            lines.append(
                "\n### (b) short training, test metrics (full test set unless noted; nats, lower is better)\n"
            )
            if is_sp:
                lines.append(
                    "| estimator | paper column | test NLL m=100 (ours) | paper NLL | test E[-log p(y|h)] "
                    "(1 sample) | train seconds |"
                )
            else:
                n_b = next(iter(r.get("iw_bound", {}).values()), {}).get("bound_examples", "?")
                lines.append(
                    f"| estimator | paper column | test -ELBO (ours) | paper -ELBO | first {n_b} test "
                    f"examples: -ELBO / -IW bound m={m} | train seconds |"
                )
            lines.append("|---|---|---|---|---|---|")
            for name, s in runs.items():
                if is_sp:
                    main, other = -s["test/bound_100"], -s["test/elbo"]
                else:
                    main = -s["test/elbo"]
                    iw = r.get("iw_bound", {}).get(name, {})
                    other = f"{fmt(-iw.get('test/elbo', float('nan')))} / {fmt(-iw.get(f'test/bound_{m}', float('nan')))}"
                other = other if isinstance(other, str) else fmt(other)
                lines.append(
                    f"| {name} | {PAPER_NAME.get(name, name)} | {fmt(main)} | {setup['paper'][name]} | "
                    f"{other} | {fmt(s['train_seconds'], 0)} |"
                )
            order = r.get("ordering", {})
            if order:
                lines.append(
                    f"\nordering, best first: ours {' < '.join(order['ours'])}; paper "
                    f"{' < '.join(order['paper'])}; Kendall tau {fmt(order['kendall_tau'])}\n"
                )
    lines.append(f"\nphase times (s): {json.dumps({k: round(v, 1) for k, v in results['times'].items()})}\n")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Tasks run in worker processes (one torch thread each)
# --------------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def task_train(args, key: str, est: str) -> tuple[str, str, dict, float]:
    """One short training run through the project's runner; the run directory is made afresh."""
    t = time.perf_counter()
    run_dir = args.out / key / est
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an old one
    summary = train(compose_cfg(run_overrides(args, SETUPS[key], est, args.steps)), run_dir)
    return key, est, summary, time.perf_counter() - t


def task_variance(args, key: str, point: str, names: list[str]) -> tuple[str, str, dict, float]:
    """Variance of ``names`` at initialisation (the runner's own build: the runs' initial parameters) or at
    the parameters of the MuProp-C run's final checkpoint."""
    t = time.perf_counter()
    run = build(compose_cfg(run_overrides(args, SETUPS[key], "muprop_c", args.steps)))
    step = 0
    if point == "trained":
        ckpt = torch.load(args.out / key / "muprop_c" / CHECKPOINT, map_location="cpu", weights_only=False)
        run.model.load_state_dict(ckpt["model"])
        step = int(ckpt["step"])
    stats = variance_table(args, run.model, run.data, names, est_step=step)
    for s in stats.values():
        s["params_step"] = step
    return key, point, stats, time.perf_counter() - t


def task_iw_bound(args, key: str, est: str) -> tuple[str, str, dict, float]:
    """The SBN's importance-weighted test bound with ``--sbn-bound-samples`` samples, from the run's checkpoint
    (the runner's own final pass computes only the ELBO for the SBN runs, to keep the budget)."""
    t = time.perf_counter()
    run = build(compose_cfg(run_overrides(args, SETUPS[key], est, args.steps)))
    ckpt = torch.load(args.out / key / est / CHECKPOINT, map_location="cpu", weights_only=False)
    run.model.load_state_dict(ckpt["model"])
    torch.manual_seed(args.seed)
    m, test = args.sbn_bound_samples, run.data.split("test")
    bound = evaluate(run.model, test, 100, m, 100, max_examples=args.bound_examples)
    # the ELBO of the same examples: the test file is not shuffled, its first examples are not typical
    elbo = evaluate(run.model, test, 100, 1, max_examples=args.bound_examples)
    n = min(args.bound_examples or 10**9, len(test))
    return (
        key,
        est,
        {f"test/bound_{m}": bound, "test/elbo": elbo, "bound_examples": n},
        time.perf_counter() - t,
    )


def split_names(names: list[str], parts: int) -> list[list[str]]:
    return [names[i::parts] for i in range(parts) if names[i::parts]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training steps per estimator (part b)")
    p.add_argument("--draws", type=int, default=20, help="M gradient estimates per variance measurement")
    p.add_argument("--warmup", type=int, default=20, help="state warm-up steps of C/VN/IDB estimators")
    p.add_argument("--warmup-lr", type=float, default=3e-3)
    p.add_argument("--optim", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sbn-bound-samples", type=int, default=100, help="m of the SBN's IW test bound")
    p.add_argument(
        "--bound-examples",
        type=int,
        default=1000,
        help="test examples of the SBN's IW bound (its ELBO uses the whole test set)",
    )
    p.add_argument(
        "--val-examples", type=int, default=1000, help="validation examples of the runner's passes"
    )
    p.add_argument("--test-examples", type=int, default=None, help="limit the test set (default: all 10,000)")
    p.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (1 is fastest when shared)"
    )
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--out", type=Path, default=RESULTS / "paper_measurements")
    p.add_argument("--quick", action="store_true", help="smoke check: 20 steps, M = 5, 200 test examples")
    args = p.parse_args()
    if args.quick:
        args.steps, args.draws, args.warmup = 20, 5, 5
        args.test_examples, args.val_examples, args.bound_examples = 200, 200, 200
        args.out = args.out.with_name(args.out.name + "_quick")
    start = time.perf_counter()
    names = bernoulli_estimators()
    results = {
        "command": " ".join([".venv/bin/python", "bench/paper_measurements.py", *sys.argv[1:]]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "estimators": names,
        "times": {},
        "git_rev": git_revision(),  # estimators may be uncommitted: their files' sums identify them
        "estimator_sha256": {
            str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
            for f in sorted((ROOT / "estimators").glob("*.py"))
        },
        "setups": {k: {"variance": {"init": {}, "trained": {}}, "train": {}} for k in args.setups},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")

    def save():
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        md_path.write_text(render(results, args))

    print(f"estimators (Bernoulli): {', '.join(names)}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        args.workers, mp_context=ctx, initializer=_init_worker, initargs=(args.threads,)
    ) as pool:
        pending = set()
        # The MuProp-C runs first: the variance 'after training' needs their checkpoints.
        for key in args.setups:
            pending.add(pool.submit(task_train, args, key, "muprop_c"))
        for key in args.setups:
            for part in split_names(names, args.workers):
                pending.add(pool.submit(task_variance, args, key, "init", part))
        for key in args.setups:
            for est in SETUPS[key]["train"]:
                if est != "muprop_c":
                    pending.add(pool.submit(task_train, args, key, est))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                fn_result = fut.result()
                key, what, payload, seconds = fn_result
                r = results["setups"][key]
                if isinstance(payload, dict) and "train_seconds" in payload:  # a training run
                    r["train"][what] = payload
                    results["times"][f"{key}/train_{what}"] = seconds
                    print(
                        f"[{key}] trained {what}: test elbo {payload['test/elbo']:.2f}, "
                        f"{', '.join(f'{k} {v:.2f}' for k, v in payload.items() if k.startswith('test/bound'))}"
                        f" ({payload['train_seconds']:.0f} s training, {seconds:.0f} s in all)",
                        flush=True,
                    )
                    if what == "muprop_c":
                        for part in split_names(names, args.workers):
                            pending.add(pool.submit(task_variance, args, key, "trained", part))
                    if not key.startswith("sp"):
                        pending.add(pool.submit(task_iw_bound, args, key, what))
                elif what in ("init", "trained"):  # a variance measurement
                    r["variance"][what].update(payload)
                    results["times"][f"{key}/variance_{what}"] = (
                        results["times"].get(f"{key}/variance_{what}", 0.0) + seconds
                    )
                    print(f"[{key}] variance at {what}: {', '.join(payload)} ({seconds:.0f} s)", flush=True)
                else:  # an IW bound of a finished SBN run
                    r.setdefault("iw_bound", {})[what] = payload
                    results["times"][f"{key}/iw_bound_{what}"] = seconds
                    print(f"[{key}] IW bound of {what}: {payload} ({seconds:.0f} s)", flush=True)
                save()
    for key in args.setups:
        r, setup = results["setups"][key], SETUPS[key]
        for point in ("init", "trained"):  # table order: the estimator list's order
            r["variance"][point] = {n: r["variance"][point][n] for n in names if n in r["variance"][point]}
        r["train"] = {n: r["train"][n] for n in setup["train"] if n in r["train"]}
        r["trained_steps"] = args.steps
        metric = (lambda s: -s["test/bound_100"]) if key.startswith("sp") else (lambda s: -s["test/elbo"])
        ours = sorted(r["train"], key=lambda n: metric(r["train"][n]))
        paper = sorted(setup["paper"], key=setup["paper"].get)
        r["ordering"] = {"ours": ours, "paper": paper, "kendall_tau": kendall_tau(ours, paper)}
    results["times"]["total_wall"] = time.perf_counter() - start
    save()
    print("\n" + render(results, args))
    print(f"written: {json_path} and {md_path}")


if __name__ == "__main__":
    main()
