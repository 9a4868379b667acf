"""Reproduce a paper's table through the sweep machinery, and write it beside the paper's numbers.

    python -m runners.reproduce muprop_table3 [--rows sbn_1layer,sbn_2layer] [--steps 100000] [--seeds 1,2,3]
        [--lrs 3e-3,1e-3,3e-4] [--launcher packed | parallel --n-jobs 4] [--data-root DIR] [--out results]

Each row of the table is one ``python run.py -m experiment=<preset> estimator=... seed=... optim.lr=...`` sweep in
``<sweep root>/<table>/<row>`` (``--sweep-root``, default ``outputs/reproduce``). Re-running the same command
finishes an interrupted reproduction: finished jobs are skipped, interrupted ones resume from their checkpoint,
failed ones (a learning rate that diverges) are retried once per invocation and then reported as failed.
``--report-only`` rebuilds the table from what is on disk.

The protocol is the paper's (Gu et al. 2016, Sec. 5; ../shared/REFERENCE.md Sec. 3): SGD with momentum 0.9,
minibatch 100, a learning rate per estimator from the paper's grid. One deliberate difference: the learning
rate is chosen per estimator and row on the **validation** bound (mean over seeds) and the test number is
reported at that rate; the paper reports the best *test* result. Training length is not stated in the paper:
``--steps`` is ours, and written into the results.

Outputs (``--out``, default ``results/``): ``<table>.md`` and ``<table>.csv`` (ours as mean ± std over seeds at
the chosen rate, the paper's number, the difference, the rate, seeds), ``<table>_<row>.png`` (validation bound
vs step per estimator at its chosen rate), and under the table the paper's claims, each checked on our numbers.
Every file states the command, the hardware, the steps and the wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    key: str  # short name on the command line (--rows)
    preset: str  # conf/experiment/<preset>.yaml
    label: str  # as the paper names the model
    paper: dict[str, float | None]  # estimator -> the paper's number (None: not available to us)
    note: str = ""
    overrides: list[str] = field(
        default_factory=list
    )  # run.py overrides of this row (e.g. model.components=2)
    metric: str | None = None  # the row's own summary key (default: the table's)
    negate: bool = True  # the table shows -metric (bounds); False for a KL


@dataclass
class Table:  # noqa: D101
    title: str
    metric: str  # summary key; the table shows its negative (nats, lower is better)
    metric_name: str
    lrs: list[float]  # the paper's learning-rate grid
    rows: list[Row]
    skipped: list[str] = field(default_factory=list)  # rows of the paper we cannot run, with the reason
    protocol: str = "batch 100, SGD momentum 0.9"  # what the presets train with, for the header
    selection: str = "the paper chose on test"  # how the paper picked its learning rate
    claims_note: str = "(no row has enough finished runs)"  # under the table when no claim could be checked


T3_EST = ["nvil", "muprop_c", "muprop_c_idb", "st", "darn"]
T2_EST = ["nvil", "muprop_c", "muprop_c_vn", "st", "darn"]
NAMES = {
    "nvil": "LR-C-VN-IDB (NVIL)",
    "muprop_c": "MuProp-C",
    "muprop_c_idb": "MuProp-C-IDB",
    "muprop_c_vn": "MuProp-C-VN",
    "implicit_mixture": "implicit (Graves' transform, all components)",
    "graves_mixture": "Graves (sampled component)",
    "mixture_score": "score function",
    "mixture_gumbel_st": "Gumbel-Softmax ST",
    "mixture_exact": "exact marginalisation",
    "reparam": "reparameterization",
    "st": "ST",
    "darn": "1/2",
}
NOT_LISTED = "the paper's number for this row is not in ../shared/REFERENCE.md"
MIX_EST = ["implicit_mixture", "graves_mixture", "mixture_score", "mixture_gumbel_st", "mixture_exact"]
GRAVES_NOTE = "Graves 2016 proposes the experiment and reports no number"

TABLES: dict[str, Table] = {
    "muprop_table3": Table(
        title="MuProp (Gu et al. 2016) Table 3: generative modelling, fixed binarized MNIST",
        metric="test/elbo",
        metric_name="test −ELBO (nats)",
        lrs=[3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6],
        rows=[
            Row(
                "sbn_1layer",
                "muprop_table3_sbn_1layer",
                "SBN 200-784",
                dict(zip(T3_EST, [113.5, 113.6, 113.1, 129.4, 112.4])),
            ),
            Row(
                "sbn_2layer",
                "muprop_table3_sbn_2layer",
                "SBN 200-200-784",
                dict(zip(T3_EST, [99.7, 100.4, 100.4, 119.9, 103.5])),
            ),
            Row(
                "sbn_3layer",
                "muprop_table3_sbn_3layer",
                "SBN 200-200-200-784",
                dict(zip(T3_EST, [97.5, 101.1, 98.6, 116.7, 99.3])),
            ),
            Row("fdarn", "muprop_table3_fdarn", "fDARN 200-784", dict.fromkeys(T3_EST), NOT_LISTED),
            Row(
                "categorical",
                "muprop_table3_categorical",
                "Categorical (200×10)-784",
                dict.fromkeys(T3_EST),
                NOT_LISTED,
            ),
        ],
    ),
    "graves2016": Table(
        title="Graves 2016's proposed uses, done: mixture-posterior VAEs and mixture SVI (the report has no numbers)",
        metric="test/elbo",
        metric_name="VAE rows: test −ELBO (nats); SVI rows: KL(q ‖ target) (nats)",
        lrs=[1e-3],
        protocol="batch 100, Adam (the presets' optimiser)",
        selection="Graves 2016 runs no experiment: this design is ours (REFERENCE.md Sec. 5)",
        claims_note="(Graves 2016 states no quantitative claim about these experiments)",
        rows=[
            Row(
                "vae_gaussian",
                "mixture_vae",
                "VAE, Gaussian posterior (K = 1)",
                {"reparam": None},
                GRAVES_NOTE,
                ["model=vae", "model.latent_dim=50"],
            ),
            *[
                Row(
                    f"vae_k{k}",
                    "mixture_vae",
                    f"VAE, mixture posterior K = {k}",
                    dict.fromkeys(MIX_EST),
                    GRAVES_NOTE,
                    [f"model.components={k}"],
                )
                for k in (2, 5, 10)
            ],
            Row(
                "svi_ring",
                "mixture_svi_ring",
                "SVI, 2-D ring (K = 8)",
                dict.fromkeys(MIX_EST),
                GRAVES_NOTE,
                ["optim.lr=1e-2"],
                metric="test/kl_to_target",
                negate=False,
            ),
            Row(
                "svi_gmm10",
                "mixture_svi_gmm10",
                "SVI, 10-D Gaussian mixture",
                dict.fromkeys(MIX_EST),
                GRAVES_NOTE,
                ["optim.lr=1e-2"],
                metric="test/kl_to_target",
                negate=False,
            ),
        ],
    ),
    "muprop_table2": Table(
        title="MuProp (Gu et al. 2016) Table 2: structured output prediction (lower half of MNIST from the upper)",
        metric="test/bound_100",
        metric_name="test NLL, m = 100 (nats)",
        lrs=[3e-3, 1e-3, 3e-4, 1e-4, 3e-5],
        rows=[
            Row(
                "mnist_2layer",
                "muprop_table2_mnist_2layer",
                "MNIST 392-200-200-392",
                dict(zip(T2_EST, [63.2, 57.7, 56.7, 56.1, 57.2])),
            ),
            Row(
                "mnist_3layer",
                "muprop_table2_mnist_3layer",
                "MNIST 392-200-200-200-392",
                dict(zip(T2_EST, [100.6, 62.7, 57.2, 54.4, 55.8])),
            ),
        ],
        skipped=["TFD rows: the Toronto Face Database is not public, so they cannot be reproduced here"],
    ),
}


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def sweep_command(table: Table, row: Row, args: argparse.Namespace) -> list[str]:
    estimators = args.estimators or list(row.paper)
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        f"experiment={row.preset}",
        f"estimator={','.join(estimators)}",
        f"seed={','.join(str(s) for s in args.seeds)}",
        *(
            []
            if any(o.startswith("optim.lr=") for o in row.overrides) and not args.lrs
            else [f"optim.lr={','.join(repr(float(lr)) for lr in (args.lrs or table.lrs))}"]
        ),
        f"train.steps={args.steps}",
        f"hydra.sweep.dir={sweep_dir(args, row)}",
        # folders named by the job's values, not its number in the sweep, so that a reproduction re-run
        # with more seeds, rates or estimators finds the runs it already has (a number would shift)
        f"hydra.sweep.subdir={JOB_SUBDIR}",
        f"logger.mode={args.logger}",
        "quiet=true",
    ]
    cmd += [o for o in row.overrides if not (args.lrs and o.startswith("optim.lr="))]  # --lrs wins
    if args.data_root:
        cmd.append(f"data.root={args.data_root}")
    if (
        args.eval_samples and table.metric != "test/bound_100" and row.metric is None
    ):  # Table 2's metric: m = 100
        cmd.append(f"eval.samples={args.eval_samples}")
    if args.launcher != "basic":
        cmd.append(f"hydra/launcher={args.launcher}")
        if args.launcher == "parallel":
            cmd.append(f"hydra.launcher.n_jobs={args.n_jobs or 2}")
        elif args.launcher == "packed" and args.n_jobs:  # each pack dealt over n_jobs processes side by side
            cmd.append(f"hydra.launcher.n_jobs={args.n_jobs}")
    return cmd + list(args.override)


JOB_SUBDIR = "${model.name}_${estimator.name}_lr${optim.lr}_s${seed}"


def row_lrs(table: Table, row: Row, args: argparse.Namespace) -> list[float]:
    """The learning rates a row is run with: --lrs, else the row's own rate, else the table's grid."""
    if args.lrs:
        return args.lrs
    own = [o.split("=", 1)[1] for o in row.overrides if o.startswith("optim.lr=")]
    return [float(x) for x in own[-1].split(",")] if own else table.lrs


def sweep_dir(args: argparse.Namespace, row: Row) -> Path:
    return Path(args.sweep_root).resolve() / args.table / row.key


def run_rows(table: Table, rows: list[Row], args: argparse.Namespace) -> None:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    for row in rows:
        cmd = sweep_command(table, row, args)
        print(f"[{row.key}] {shlex.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode >= 128:  # interrupted: stop here, the same command resumes
            sys.exit(proc.returncode)
        if (
            proc.returncode != 0
        ):  # failed jobs (a rate that diverges): reported in the table, retried on re-run
            print(f"[{row.key}] some jobs failed; their error.txt says why", flush=True)


# --------------------------------------------------------------------------------------------------
# collecting and reporting
# --------------------------------------------------------------------------------------------------


@dataclass
class Job:
    estimator: str
    seed: int
    lr: float
    steps: int
    dir: Path
    summary: dict[str, Any] | None  # None: not finished
    error: str | None


def collect(
    row_dir: Path, steps: int, seeds: list[int] | None = None, lrs: list[float] | None = None
) -> list[Job]:
    """The row's jobs of this budget (and of these seeds and rates, when given) found in its sweep folder."""
    jobs = []
    for d in sorted(p for p in row_dir.glob("*") if p.is_dir() and not p.name.startswith(".")):
        cfg_path = d / "config.yaml" if (d / "config.yaml").exists() else d / ".hydra" / "config.yaml"
        if not cfg_path.exists():
            continue
        cfg = yaml.safe_load(cfg_path.read_text())
        if int(cfg["train"]["steps"]) != steps:
            continue  # a job of another budget in the same folder: not this reproduction
        if (seeds is not None and int(cfg["seed"]) not in seeds) or (
            lrs is not None and not any(math.isclose(float(cfg["optim"]["lr"]), lr) for lr in lrs)
        ):
            continue  # another seed or rate than this command's: reported by the command that asks for it
        summary = json.loads((d / "summary.json").read_text()) if (d / "DONE").exists() else None
        error = (d / "error.txt").read_text().splitlines()[0] if (d / "error.txt").exists() else None
        jobs.append(
            Job(
                cfg["estimator"]["name"],
                int(cfg["seed"]),
                float(cfg["optim"]["lr"]),
                steps,
                d,
                summary,
                error,
            )
        )
    # one job per (estimator, seed, rate): a sweep folder of an earlier version (named by job number) can hold
    # the same job as a value-named folder; the finished one counts, else the value-named one
    best: dict[tuple[str, int, float], Job] = {}
    for j in jobs:
        key = (j.estimator, j.seed, j.lr)
        rank = (j.summary is not None, not j.dir.name[:1].isdigit())
        if key not in best or rank > (best[key].summary is not None, not best[key].dir.name[:1].isdigit()):
            best[key] = j
    if len(best) < len(jobs):
        print(
            f"note: {row_dir} holds {len(jobs) - len(best)} folder(s) of a job that another folder also holds; "
            "each job is counted once",
            file=sys.stderr,
        )
    return [j for j in jobs if best[(j.estimator, j.seed, j.lr)] is j]


def val_curve(d: Path) -> list[tuple[int, float]]:
    out = []
    path = d / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if (
                "val/elbo" in rec and rec["step"] > 0
            ):  # the final record's validation too (after the last step)
                out.append((int(rec["step"]), -float(rec["val/elbo"])))
    return out


@dataclass
class Cell:
    estimator: str
    lr: float | None
    values: list[float]  # the metric (nats, lower is better) per seed at the chosen rate
    val: float | None  # mean validation -bound at the chosen rate
    failed: list[str]  # lrs whose jobs failed (diverged)
    unfinished: int
    curves: list[list[tuple[int, float]]]
    bounds: list[float] = field(default_factory=list)  # -test/bound_m per seed (another m than the metric's)
    bound_m: int | None = None
    sec_per_step: list[float] = field(default_factory=list)  # training wall time per step, per seed
    partial: bool = False  # the chosen rate has unfinished seeds: its finished ones are shown

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


def choose(jobs: list[Job], estimator: str, metric: str, negate: bool = True) -> Cell:
    mine = [j for j in jobs if j.estimator == estimator]
    by_lr: dict[float, list[Job]] = {}
    for j in mine:
        by_lr.setdefault(j.lr, []).append(j)
    failed = sorted({f"{j.lr:g}" for j in mine if j.summary is None and j.error})
    unfinished = sum(1 for j in mine if j.summary is None and not j.error)
    best = None
    # a rate is compared when all its seeds finished; only where no rate has, the rates with finished seeds
    # and none failed (an interrupted reproduction: the cell shows its finished seeds, marked partial)
    for complete_only in (True, False):
        for lr, group in by_lr.items():
            done = [j for j in group if j.summary is not None]
            if not done or (len(done) < len(group) and (complete_only or any(j.error for j in group))):
                continue
            val = statistics.fmean(-float(j.summary["val/elbo"]) for j in done)
            if math.isfinite(val) and (best is None or val < best[1]):
                best = (lr, val, done)
        if best is not None:
            break
    if best is None:
        return Cell(estimator, None, [], None, failed, unfinished, [])
    lr, val, done = best
    values = [(-1.0 if negate else 1.0) * float(j.summary[metric]) for j in done]
    cell = Cell(estimator, lr, values, val, failed, unfinished, [val_curve(j.dir) for j in done])
    cell.partial = len(done) < len(by_lr[lr])
    # the importance-weighted bound beside the metric (VAE and SBN rows, whose metric is the ELBO: m from
    # eval.samples); none where the metric is itself a bound (Table 2) or not a bound at all (SVI's KL)
    keys = [k for k in done[0].summary if k.startswith("test/bound_")] if metric == "test/elbo" else []
    if keys and all(keys[0] in j.summary for j in done):
        cell.bound_m = int(keys[0].rsplit("_", 1)[1])
        cell.bounds = [-float(j.summary[keys[0]]) for j in done]
    if all("train_seconds" in j.summary for j in done):
        cell.sec_per_step = [float(j.summary["train_seconds"]) / j.steps for j in done]
    return cell


def mean_std(values: list[float], nd: int = 2) -> str:
    """``mean ± std`` over seeds (the mean alone for one seed, – for none)."""
    if not values:
        return "–"
    if len(values) == 1:
        return fmt(values[0], nd)
    return f"{fmt(statistics.fmean(values), nd)} ± {fmt(statistics.stdev(values), nd)}"


def steps_to(curves: list[list[tuple[int, float]]], threshold: float) -> int | None:
    """First evaluation step at which the seed-mean validation bound is at or below ``threshold``."""
    if not curves:
        return None
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
    for s in steps:
        mean = statistics.fmean(dict(c)[s] for c in curves)
        if mean <= threshold:
            return s
    return None


def fmt(x: float | None, nd: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def claims(table_key: str, results: dict[str, dict[str, Cell]]) -> list[str]:
    """The paper's claims, each checked on the numbers of this reproduction."""
    out = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("holds" if ok else "does not hold")

    for row_key, cells in results.items():
        done = {e: c for e, c in cells.items() if c.values}
        if table_key == "muprop_table3" and {"nvil", "muprop_c"} <= set(done):
            a, b = done["muprop_c"], done["nvil"]
            # the worse of the two final validation bounds: both reach it; the others are shown if they do
            threshold = max(a.val, b.val)
            reach = {e: steps_to(c.curves, threshold) for e, c in done.items()}
            faster = None if None in (reach["muprop_c"], reach["nvil"]) else reach["muprop_c"] < reach["nvil"]
            if faster is False and reach["muprop_c"] == reach["nvil"]:
                faster = None  # reached at the same evaluation: the evaluation grid cannot tell
            out.append(
                f"{row_key}: MuProp-C on par with NVIL at the end (|Δ| ≤ 1 nat): {verdict(abs(a.mean - b.mean) <= 1.0)} "
                f"({fmt(a.mean)} vs {fmt(b.mean)}); converges faster: {verdict(faster)} — steps to reach the "
                f"validation bound {threshold:.2f} (the worse final one of the two; evaluated every train.eval_every "
                f"steps): "
                + ", ".join(f"{NAMES.get(e, e)} {reach[e] if reach[e] is not None else '–'}" for e in done)
            )
        if table_key == "muprop_table3" and "st" in done and len(done) > 1:
            worst = max(done, key=lambda e: done[e].mean)
            is_sbn = row_key.startswith("sbn")
            if is_sbn:
                out.append(
                    f"{row_key}: ST is the worst: {verdict(worst == 'st')} (worst: {NAMES.get(worst, worst)})"
                )
            if "darn" in done:
                beats = done["darn"].mean < done["st"].mean
                want = is_sbn  # 1/2 beats ST on the SBNs, and not on the categorical model
                if is_sbn or row_key == "categorical":
                    out.append(
                        f"{row_key}: 1/2 {'beats' if want else 'does not beat'} ST: {verdict(beats == want)} "
                        f"({fmt(done['darn'].mean)} vs {fmt(done['st'].mean)})"
                    )
        if table_key == "muprop_table2" and len(done) >= 3:
            top = sorted(done, key=lambda e: done[e].mean)[:2]
            out.append(
                f"{row_key}: ST and MuProp-C-VN lead: {verdict(set(top) == {'st', 'muprop_c_vn'})} "
                f"(best two: {', '.join(NAMES.get(e, e) for e in top)})"
            )
    return out


def hardware() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except Exception:  # noqa: BLE001 - the report is still written without torch
        gpu, tv = "unknown", "unknown"
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; torch {tv}; {platform.platform()}"


def plot_row(path: Path, row: Row, cells: dict[str, Cell], table: Table) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e, c in cells.items():
        if not c.curves:
            continue
        steps = sorted(set.intersection(*[{s for s, _ in cv} for cv in c.curves]))
        ys = [statistics.fmean(dict(cv)[s] for cv in c.curves) for s in steps]
        ax.plot(steps, ys, label=f"{NAMES.get(e, e)} (lr {c.lr:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation −bound (nats, m = 1)")
    ax.set_title(f"{row.label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lows = [v for c in cells.values() for cv in c.curves for _, v in cv]
    if lows:
        lo = min(lows)
        ax.set_ylim(lo - 2, min(max(lows), lo + 80))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    table_key: str, table: Table, rows: list[Row], args: argparse.Namespace, command: str, wall: float
) -> Path:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Cell]] = {}
    train_seconds = 0.0
    for row in rows:
        jobs = collect(sweep_dir(args, row), args.steps, args.seeds, row_lrs(table, row, args))
        train_seconds += sum(float(j.summary.get("train_seconds", 0.0)) for j in jobs if j.summary)
        estimators = args.estimators or list(row.paper)
        results[row.key] = {e: choose(jobs, e, row.metric or table.metric, row.negate) for e in estimators}
    header = [
        f"# {table.title}",
        "",
        f"Command: `{command}`  ",
        f"Hardware: {hardware()}  ",
        f"Steps per run: {args.steps} ({table.protocol}); seeds: {', '.join(map(str, args.seeds))}; "
        f"learning rates tried: {', '.join(f'{lr:g}' for lr in (args.lrs or table.lrs))}  ",
        f"Training wall time, summed over the runs: {train_seconds / 3600:.2f} h"
        + ("  " if args.report_only else f"; wall time of the last invocation: {wall / 60:.1f} min  "),
        f"Metric: {table.metric_name}, lower is better; ours is mean ± std over seeds at the learning rate chosen on the "
        f"validation bound ({table.selection}); Δ = ours − paper.",
        "",
        "Bound: −(test importance-weighted bound with m samples), nats, mean ± std over the same seeds (– where the "
        "metric is that bound, or for SVI); ms/step: training wall time per step (this machine, shared: compare within "
        "one table only).",
        "",
        "| model | estimator | ours | paper | Δ | lr | seeds | bound (m) | ms/step | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines, csv_rows = list(header), []
    for row in rows:
        for e, c in results[row.key].items():
            paper = row.paper.get(e)
            delta = c.mean - paper if (paper is not None and c.values) else None
            notes = []
            if c.failed:
                notes.append(f"diverged at lr {', '.join(c.failed)}")
            if c.unfinished:
                notes.append(f"{c.unfinished} run(s) unfinished")
            if c.partial:
                notes.append("the finished seeds only")
            if not c.values and not c.failed and not c.unfinished:
                notes.append("not run yet (the same command runs it)")
            if paper is None and row.note != GRAVES_NOTE:  # Graves: said once, in the header
                notes.append(row.note or "no paper number")
            ours = mean_std(c.values)
            bound = f"{mean_std(c.bounds)} ({c.bound_m})" if c.bounds else "–"
            ms = mean_std([1e3 * t for t in c.sec_per_step], 1)
            lines.append(
                f"| {row.label} | {NAMES.get(e, e)} | {ours} | {fmt(paper, 1)} | "
                f"{'–' if delta is None else f'{delta:+.2f}'} | {'–' if c.lr is None else f'{c.lr:g}'} | "
                f"{len(c.values)} | {bound} | {ms} | {'; '.join(notes)} |"
            )
            csv_rows.append(
                {
                    "model": row.label,
                    "estimator": e,
                    "ours_mean": c.mean,
                    "ours_std": c.std,
                    "paper": paper,
                    "delta": delta,
                    "lr": c.lr,
                    "seeds": len(c.values),
                    "val_bound": c.val,
                    "bound_m": c.bound_m,
                    "bound_mean": statistics.fmean(c.bounds) if c.bounds else None,
                    "bound_std": statistics.stdev(c.bounds) if len(c.bounds) > 1 else None,
                    "ms_per_step": 1e3 * statistics.fmean(c.sec_per_step) if c.sec_per_step else None,
                    "steps": args.steps,
                    "notes": "; ".join(notes),
                }
            )
        png = out / f"{table_key}_{row.key}.png"
        if any(c.curves for c in results[row.key].values()):
            plot_row(png, row, results[row.key], table)
    lines += ["", "**The paper's claims, checked on these numbers:**", ""]
    lines += [f"- {c}" for c in claims(table_key, results)] or [f"- {table.claims_note}"]
    for s in table.skipped:
        lines.append(f"- Not reproduced: {s}.")
    pngs = [
        f"![{r.label}]({table_key}_{r.key}.png)" for r in rows if (out / f"{table_key}_{r.key}.png").exists()
    ]
    if pngs:
        lines += ["", "Validation bound vs step (seed mean, chosen learning rate):", "", *pngs]
    md = out / f"{table_key}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / f"{table_key}.csv", "w", newline="", encoding="utf-8") as f:
        f.write(
            f"# command: {command}\n# hardware: {hardware()}\n# steps: {args.steps}; train hours: {train_seconds / 3600:.3f}\n"
        )
        w = csv.DictWriter(f, fieldnames=list(csv_rows[0]) if csv_rows else ["model"])
        w.writeheader()
        w.writerows(csv_rows)
    print("\n".join(lines))
    return md


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m runners.reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("table", choices=sorted(TABLES))
    ap.add_argument(
        "--rows",
        help="comma-separated row keys (default: every row); "
        + "; ".join(f"{k}: {', '.join(r.key for r in t.rows)}" for k, t in TABLES.items()),
    )
    ap.add_argument("--estimators", help="comma-separated estimators (default: the paper's columns)")
    ap.add_argument("--steps", type=int, default=100_000, help="training steps per run (default 100000)")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    ap.add_argument("--lrs", help="comma-separated learning rates (default: the paper's grid)")
    ap.add_argument(
        "--launcher",
        default="basic",
        choices=["basic", "packed", "parallel", "slurm", "local"],
        help="packed: each row's jobs of one estimator as members of one process (runners/pack.py)",
    )
    ap.add_argument(
        "--n-jobs",
        type=int,
        help="processes at once: jobs with --launcher parallel (default 2); with packed, each estimator's pack "
        "dealt over this many processes side by side (default 1)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (OMP_NUM_THREADS)")
    ap.add_argument("--data-root", default=os.environ.get("DATA_ROOT"))
    ap.add_argument(
        "--eval-samples", type=int, help="m of the extra IW bound of Table 3 (default: the preset's)"
    )
    ap.add_argument("--logger", default="offline", choices=["offline", "online", "disabled"])
    ap.add_argument("--sweep-root", default=str(ROOT / "outputs" / "reproduce"))
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the table from the runs on disk")
    ap.add_argument("override", nargs="*", help="more run.py overrides for every job, e.g. variance.every=0")
    args = ap.parse_intermixed_args(argv)
    table = TABLES[args.table]
    keys = [r.key for r in table.rows]
    args.rows = args.rows.split(",") if args.rows else keys
    bad = [r for r in args.rows if r not in keys]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)} of {args.table}; choose from {', '.join(keys)}")
    args.estimators = args.estimators.split(",") if args.estimators else None
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    for name, values in (("--seeds", args.seeds), ("--lrs", args.lrs), ("--estimators", args.estimators)):
        if values and len(set(values)) < len(values):
            # two jobs of the same values would share one folder (named by them): one would be refused
            ap.error(f"{name} lists a value twice: {','.join(map(str, values))}")
    return args


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    args = parse(raw)
    table = TABLES[args.table]
    rows = [r for r in table.rows if r.key in args.rows]
    # the command that re-runs it (a --report-only rebuild shows the training command it summarises)
    command = shlex.join(["python", "-m", "runners.reproduce", *[a for a in raw if a != "--report-only"]])
    t0 = time.perf_counter()
    if not args.report_only:
        run_rows(table, rows, args)
    report(args.table, table, rows, args, command, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
