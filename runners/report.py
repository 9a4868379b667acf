"""Comparison report of any set of runs, from their local files only (W&B not needed).

    python -m runners.report outputs/sweeps/table3 outputs/runs/2026-01-01_sbn_muprop_s1 [--out DIR]

Reads, under every directory given (a run, a sweep, or any folder of them), each run directory's
``config.yaml`` (resolved, written by runners/train.py), ``metrics.jsonl`` and ``summary.json`` (finished runs),
plus ``error.txt`` of failed jobs. Runs are grouped by model (rows) and estimator (columns); seeds of the same
configuration are averaged. Writes into ``--out`` (default ``<the one directory>/report``):

* ``val_elbo_step.png``, ``val_elbo_time.png``: validation bound ``val/elbo`` against step and against
  wall-clock ``time/elapsed``; ``grad_log10_var.png``: ``grad/<estimator>/log10_var`` and ``log10_var_rec``
  against step; ``trajectory.png`` (runs with ``variance.basket`` or ``variance.bias``): every estimator
  measured along the same trajectory, and its bias z2. Each line is the mean over seeds, the band min-max.
* ``table_test_elbo.csv``, ``table_test_bound_<m>.csv`` and ``report.md``: final test bounds laid out like the
  papers' tables (rows = model, columns = estimator), as **negative bounds in nats** (-ELBO, -log-likelihood
  bound: lower is better), mean ± std over seeds (sample std; the number of seeds in parentheses).
* ``report.html``: one self-contained page with the tables, the plots (embedded) and the list of runs.
* ``--wandb offline|online``: the same table as a ``wandb.Table`` and the plots as images in one W&B run
  (job_type ``report``) of the runs' group.

Runs that differ in anything but the seed (and keys that do not change training: paths, logging, evaluation,
variance measurement) are kept apart: the differing keys are added to the model or estimator label.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from runners.logger import DONE, ERROR_FILE, METRICS_FILE, SUMMARY

#: keys that do not split groups: the seed is averaged over; the others do not change the training trajectory
NOT_A_DIFFERENCE = (
    "seed",
    "git_rev",
    "quiet",
    "device",
    "logger",
    "data.root",
    "data.download",
    "data.verify",
    "eval",
    "variance",
    "experiment_name",
    "hydra",
)
SKIP_DIRS = {"wandb", ".hydra", ".submitit", "report"}


@dataclass
class RunData:
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    status: str  # done | failed | incomplete
    error: str | None = None
    flat: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.flat.get("model.name", "?"))

    @property
    def estimator(self) -> str:
        return str(self.flat.get("estimator.name", "?"))

    @property
    def seed(self) -> Any:
        return self.flat.get("seed")

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.metrics if "step" in r]
        return max(steps) if steps else None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _is_run_dir(d: Path) -> bool:
    return any((d / f).exists() for f in ("config.yaml", METRICS_FILE, ERROR_FILE, ".hydra/config.yaml"))


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run directory under ``paths`` (a path may itself be one)."""
    found: list[Path] = []

    def walk(d: Path) -> None:
        if _is_run_dir(d):
            found.append(d)
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS):
            walk(sub)

    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a directory")
        walk(p)
    return found


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return out


def load_run(d: Path) -> RunData:
    cfg_path = d / "config.yaml" if (d / "config.yaml").exists() else d / ".hydra" / "config.yaml"
    config: dict[str, Any] = {}
    if cfg_path.exists():
        conf = OmegaConf.load(cfg_path)
        try:
            config = OmegaConf.to_container(conf, resolve=True)
        except Exception:  # noqa: BLE001 - Hydra's own copy may hold interpolations of hydra.* keys
            config = OmegaConf.to_container(conf, resolve=False)
    summary = json.loads((d / SUMMARY).read_text()) if (d / SUMMARY).exists() else None
    error = None
    if (d / DONE).exists():
        status = "done"
    elif (d / ERROR_FILE).exists():
        status = "failed"
        lines = (d / ERROR_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
        error = lines[0] if lines else ""
    else:
        status = "incomplete"
    run = RunData(d, config, read_jsonl(d / METRICS_FILE), summary, status, error)
    run.flat = flatten(config)
    return run


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_A_DIFFERENCE)


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def label_runs(runs: list[RunData]) -> dict[tuple[str, str], list[RunData]]:
    """{(model label, estimator label): runs that differ only in the seed}."""

    def key(run: RunData) -> tuple:
        return tuple(sorted((k, _fmt(v)) for k, v in run.flat.items() if not _free(k)))

    groups: dict[tuple, list[RunData]] = defaultdict(list)
    for r in runs:
        groups[key(r)].append(r)
    datasets = {str(r.flat.get("data.name")) for r in runs}

    def differing(members: list[tuple], prefix_ok) -> dict[tuple, str]:
        """For groups sharing a label: the keys (passing prefix_ok) whose values differ among them."""
        dicts = [dict(k) for k in members]
        keys = sorted({k for d in dicts for k in d if prefix_ok(k)})
        vary = [k for k in keys if len({d.get(k) for d in dicts}) > 1]
        return {
            m: ", ".join(f"{k.split('.', 1)[-1] if k.startswith('model.') else k}={d.get(k)}" for k in vary)
            for m, d in zip(members, dicts)
        }

    # rows: model name (+ dataset when several) + the model keys that differ between groups of that name
    row_of: dict[tuple, str] = {}
    by_model: dict[str, list[tuple]] = defaultdict(list)
    for k, members in groups.items():
        base = (
            members[0].model
            if len(datasets) == 1
            else f"{members[0].flat.get('data.name')} {members[0].model}"
        )
        by_model[base].append(k)
    for base, keys in by_model.items():
        diffs = differing(
            keys, lambda k: k.startswith("model.") and k not in ("model.name", "model._target_")
        )
        for k in keys:
            row_of[k] = f"{base} ({diffs[k]})" if diffs[k] else base
    # columns: estimator name + whatever else differs between groups of the same row and estimator
    out: dict[tuple[str, str], list[RunData]] = {}
    by_cell: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for k, members in groups.items():
        by_cell[(row_of[k], members[0].estimator)].append(k)
    for (row, est), keys in by_cell.items():
        diffs = differing(keys, lambda k: not k.startswith("model.") and k != "estimator.name")
        for k in keys:
            col = f"{est} ({diffs[k]})" if diffs[k] else est
            out[(row, col)] = sorted(groups[k], key=lambda r: str(r.seed))
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------
# curves


def series(run: RunData, key: str, x: str = "step") -> list[tuple[float, float]]:
    pts = []
    for r in run.metrics:
        v, xv = r.get(key), r.get(x)
        if isinstance(v, (int, float)) and isinstance(xv, (int, float)) and math.isfinite(v):
            pts.append((float(xv), float(v)))
    return pts


def aggregate(runs: list[RunData], key: str, x: str = "step") -> dict[str, list[float]]:
    """Mean, min and max over runs of ``key`` at each step; with ``x`` other than step, x is the mean of ``x`` at
    that step (wall-clock differs between seeds). Returns lists x, mean, lo, hi, n."""
    at: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        xs = {r["step"]: r.get(x) for r in run.metrics if x != "step" and isinstance(r.get(x), (int, float))}
        for step, v in series(run, key):
            xv = step if x == "step" else xs.get(int(step))
            if xv is not None:
                at[step].append((float(xv), v))
    out: dict[str, list[float]] = {"x": [], "mean": [], "lo": [], "hi": [], "n": []}
    for step in sorted(at):
        xs_, vs = zip(*at[step])
        out["x"].append(statistics.fmean(xs_))
        out["mean"].append(statistics.fmean(vs))
        out["lo"].append(min(vs))
        out["hi"].append(max(vs))
        out["n"].append(len(vs))
    return out


def _grid(n: int, ncols_max: int = 3):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(n, ncols_max) or 1
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _band(ax, agg: dict[str, list[float]], label: str, color=None) -> bool:
    if not agg["x"]:
        return False
    (line,) = ax.plot(agg["x"], agg["mean"], label=f"{label} (n={max(agg['n'])})", color=color, lw=1.4)
    if max(agg["n"]) > 1:
        ax.fill_between(agg["x"], agg["lo"], agg["hi"], color=line.get_color(), alpha=0.2, lw=0)
    return True


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_curves(groups: dict[tuple[str, str], list[RunData]], out: Path) -> list[tuple[str, Path]]:
    """The curve figures (title, path); a figure with no data is not written."""
    rows = sorted({r for r, _ in groups})
    figures = []
    for name, key, x, xlabel, title in (
        ("val_elbo_step", "val/elbo", "step", "step", "validation ELBO (nats) vs step"),
        (
            "val_elbo_time",
            "val/elbo",
            "time/elapsed",
            "wall-clock (s)",
            "validation ELBO (nats) vs wall-clock",
        ),
    ):
        fig, axes = _grid(len(rows))
        any_data = False
        for ax, row in zip(axes, rows):
            for (r, col), runs in groups.items():
                if r == row:
                    any_data |= _band(ax, aggregate(runs, key, x), col)
            ax.set_title(row, fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("val/elbo")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        fig.suptitle(f"{title}; mean over seeds, band min-max", fontsize=10)
        if any_data:
            figures.append((title, _save(fig, out / f"{name}.png")))
        else:
            import matplotlib.pyplot as plt

            plt.close(fig)

    # gradient variance of each run's own estimator: all parameters, recognition network only
    fig, axes = _grid(2 * len(rows), ncols_max=2)
    any_data = False
    for i, row in enumerate(rows):
        for j, suffix in enumerate(("log10_var", "log10_var_rec")):
            ax = axes[2 * i + j]
            for (r, col), runs in groups.items():
                if r == row:
                    any_data |= _band(ax, aggregate(runs, f"grad/{runs[0].estimator}/{suffix}"), col)
            ax.set_title(f"{row}: {'all parameters' if j == 0 else 'recognition network'}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(f"grad/<estimator>/{suffix}")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(
        "log10 gradient variance (mean over parameters) vs step; mean over seeds, band min-max", fontsize=10
    )
    if any_data:
        figures.append(("log10 gradient variance vs step", _save(fig, out / "grad_log10_var.png")))
    else:
        import matplotlib.pyplot as plt

        plt.close(fig)

    # same-trajectory comparison: every estimator measured along one group's trajectory
    traj = {k: runs for k, runs in groups.items() if len(measured(runs)) > 1 or bias_names(runs)}
    if traj:
        has_bias = any(bias_names(runs) for runs in traj.values())
        fig, axes = _grid(len(traj) * (2 if has_bias else 1), ncols_max=2 if has_bias else 3)
        for i, ((row, col), runs) in enumerate(sorted(traj.items())):
            ax = axes[i * (2 if has_bias else 1)]
            for est in measured(runs):
                _band(ax, aggregate(runs, f"grad/{est}/log10_var"), est)
            ax.set_title(f"{row}, trajectory of {col}: log10 var", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            if has_bias:
                ax = axes[i * 2 + 1]
                for est in bias_names(runs):
                    _band(ax, aggregate(runs, f"bias/{est}/z2"), est)
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
                ax.set_yscale("log")
                ax.set_title(f"{row}, trajectory of {col}: bias z2 (1 = unbiased)", fontsize=9)
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7)
        fig.suptitle(
            "same trajectory, same minibatch: estimators compared at identical parameters", fontsize=10
        )
        figures.append(("same-trajectory comparison", _save(fig, out / "trajectory.png")))
    return figures


def measured(runs: list[RunData]) -> list[str]:
    names = {
        k.split("/")[1]
        for r in runs
        for rec in r.metrics
        for k in rec
        if k.startswith("grad/") and k.endswith("/log10_var")
    }
    return sorted(names)


def bias_names(runs: list[RunData]) -> list[str]:
    return sorted(
        {
            k.split("/")[1]
            for r in runs
            for rec in r.metrics
            for k in rec
            if k.startswith("bias/") and k.endswith("/z2")
        }
    )


# ----------------------------------------------------------------------------------------------------------
# tables


@dataclass
class Table:
    key: str  # summary key, e.g. test/elbo
    title: str
    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], list[float]]  # negative bounds of each seed

    def stats(self, row: str, col: str) -> tuple[float, float, int] | None:
        vals = self.cells.get((row, col))
        if not vals:
            return None
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        return statistics.fmean(vals), std, len(vals)

    def cell(self, row: str, col: str) -> str:
        s = self.stats(row, col)
        if s is None:
            return "–"
        mean, std, n = s
        return f"{mean:.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:.2f} (1)"

    def markdown(self) -> str:
        lines = [f"| model | {' | '.join(self.cols)} |", "|---|" + "---|" * len(self.cols)]
        lines += [f"| {row} | {' | '.join(self.cell(row, c) for c in self.cols)} |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.cols)
        body = "".join(
            f"<tr><th>{html.escape(r)}</th>"
            + "".join(f"<td>{html.escape(self.cell(r, c))}</td>" for c in self.cols)
            + "</tr>"
            for r in self.rows
        )
        return f"<table><tr><th>model</th>{head}</tr>{body}</table>"

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["model"] + [f"{c} {s}" for c in self.cols for s in ("mean", "std", "n")])
            for row in self.rows:
                vals: list[Any] = [row]
                for c in self.cols:
                    s = self.stats(row, c)
                    vals += (
                        ["", "", 0]
                        if s is None
                        else [f"{s[0]:.4f}", "" if math.isnan(s[1]) else f"{s[1]:.4f}", s[2]]
                    )
                w.writerow(vals)


def final_tables(groups: dict[tuple[str, str], list[RunData]]) -> list[Table]:
    """One table per summary metric: test/elbo, then test/bound_<m> for each m the runs used."""
    keys: list[str] = []
    for runs in groups.values():
        for r in runs:
            for k in r.summary or {}:
                if (k == "test/elbo" or k.startswith("test/bound_")) and k not in keys:
                    keys.append(k)
    keys.sort(key=lambda k: (k != "test/elbo", k))
    rows = sorted({r for r, _ in groups})
    cols = sorted({c for _, c in groups})
    tables = []
    for key in keys:
        cells = {}
        for (row, col), runs in groups.items():
            vals = [-float(r.summary[key]) for r in runs if r.summary and key in r.summary]
            if vals:
                cells[(row, col)] = vals
        what = "-ELBO" if key == "test/elbo" else f"-(importance-weighted bound, m = {key.split('_')[-1]})"
        title = f"Test {what} in nats (lower is better): mean ± std over seeds (number of seeds)"
        tables.append(Table(key, title, rows, cols, cells))
    return tables


# ----------------------------------------------------------------------------------------------------------
# the report


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def write_report(paths: list[Path], out: Path) -> dict[str, Any]:
    """Write the report of the runs under ``paths`` into ``out``; returns what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in find_runs([Path(p) for p in paths])]
    with_config = [r for r in runs if r.config]
    if not with_config:
        raise SystemExit(
            f"error: no run directories (config.yaml / metrics.jsonl) under {', '.join(map(str, paths))}"
        )
    groups = label_runs(with_config)
    figures = plot_curves(groups, out)
    tables = final_tables(groups)
    for t in tables:
        t.write_csv(out / f"table_{t.key.replace('/', '_')}.csv")

    status_lines = [
        f"| {r.path} | {r.model} | {r.estimator} | {r.seed} | {r.status} | {r.last_step} | "
        f"{(r.error or '').replace('|', '/')[:160]} |"
        for r in runs
    ]
    md = [
        f"# Report: {len(runs)} runs",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from " + ", ".join(f"`{p}`" for p in paths) + ".",
        "",
        "Values are **negative bounds in nats** (as the papers' tables: -ELBO, negative log-likelihood bound; "
        "lower is better), mean ± sample std over seeds, number of seeds in parentheses. Unfinished runs are "
        "left out of the tables and kept in the curves.",
        "",
    ]
    for t in tables:
        md += [f"## {t.title}", "", f"`{t.key}` from summary.json", "", t.markdown(), ""]
    for title, path in figures:
        md += [f"## {title}", "", f"![{title}]({path.name})", ""]
    md += [
        "## Runs",
        "",
        "| run | model | estimator | seed | status | last step | error |",
        "|---|---|---|---|---|---|---|",
        *status_lines,
        "",
    ]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Report</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
        "</style></head><body>",
        f"<h1>Report: {len(runs)} runs</h1>",
        "<p>Values are negative bounds in nats (lower is better), mean ± sample std over seeds, number of seeds "
        "in parentheses.</p>",
    ]
    for t in tables:
        page += [f"<h2>{html.escape(t.title)}</h2><p><code>{html.escape(t.key)}</code></p>", t.html()]
    for title, path in figures:
        page += [f"<h2>{html.escape(title)}</h2>", _img_tag(path)]
    samples = [
        (row, col, runs[0].path / "samples.png")
        for (row, col), runs in groups.items()
        if (runs[0].path / "samples.png").exists()
    ]
    if samples:
        page.append("<h2>Samples from the models (first seed)</h2>")
        for row, col, p in samples:
            page += [f"<h3>{html.escape(row)} / {html.escape(col)}</h3>", _img_tag(p)]
    page.append(
        "<h2>Runs</h2><table><tr><th>run</th><th>model</th><th>estimator</th><th>seed</th><th>status</th>"
        "<th>last step</th><th>error</th></tr>"
    )
    page += [
        f"<tr><td>{html.escape(str(r.path))}</td><td>{html.escape(r.model)}</td><td>{html.escape(r.estimator)}</td>"
        f"<td>{r.seed}</td><td>{r.status}</td><td>{r.last_step}</td><td>{html.escape(r.error or '')}</td></tr>"
        for r in runs
    ]
    page.append("</table></body></html>")
    (out / "report.html").write_text("\n".join(page), encoding="utf-8")
    return {"out": out, "runs": runs, "groups": groups, "tables": tables, "figures": figures}


def log_to_wandb(result: dict[str, Any], mode: str, project: str, group: str | None) -> Path | None:
    """The final tables as ``wandb.Table`` and the figures as images, in one run of job_type ``report``."""
    import wandb

    from runners.logger import generate_run_id

    out = result["out"]
    run = wandb.init(
        project=project,
        group=group,
        job_type="report",
        name="report",
        dir=str(out),
        id=generate_run_id(),
        mode=mode,
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        for t in result["tables"]:
            rows = []
            for row, col in sorted(t.cells):
                mean, std, n = t.stats(row, col)
                rows.append([row, col, mean, None if math.isnan(std) else std, n])
            run.log(
                {
                    f"report/{t.key}": wandb.Table(
                        columns=["model", "estimator", "neg_bound_mean", "neg_bound_std", "seeds"], data=rows
                    )
                }
            )
        run.log({f"report/{p.stem}": wandb.Image(str(p), caption=title) for title, p in result["figures"]})
    finally:
        run.finish()
        wandb.teardown()  # waits until W&B's service has written the run file (finish() alone may not)
    return Path(run.dir).parent if mode != "disabled" else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m runners.report", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths", nargs="+", type=Path, help="run directories, sweep directories, or folders of them"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <the one path>/report, or outputs/reports/<time> for several)",
    )
    ap.add_argument(
        "--wandb",
        choices=["offline", "online"],
        default=None,
        help="also log the tables and plots to W&B (one run, job_type=report)",
    )
    ap.add_argument("--project", default="gradest")
    ap.add_argument("--group", default=None, help="W&B group (default: the first path's folder name)")
    args = ap.parse_args(argv)
    out = args.out or (
        args.paths[0] / "report"
        if len(args.paths) == 1
        else Path("outputs/reports") / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    result = write_report(args.paths, out)
    for t in result["tables"]:
        print(f"\n{t.title}  [{t.key}]\n{t.markdown()}")
    counts = defaultdict(int)
    for r in result["runs"]:
        counts[r.status] += 1
    print(
        f"\n{len(result['runs'])} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
        f"report: {out / 'report.html'} and {out / 'report.md'}"
    )
    if args.wandb:
        wdir = log_to_wandb(result, args.wandb, args.project, args.group or args.paths[0].resolve().name)
        if wdir is not None and args.wandb == "offline":
            print(f"upload to W&B: wandb sync {wdir}")


if __name__ == "__main__":
    main()
