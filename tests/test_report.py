"""The comparison report (runners/report.py) on hand-written run directories with known numbers: grouping by
model and estimator with seeds averaged, the paper-style table (negative bounds, mean ± std), CSV, plots, the
self-contained HTML page, failed and unfinished runs, and the W&B table of the report read back offline."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from runners import report, wandb_files

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(
    d: Path,
    model: str = "sbn",
    layers=(200,),
    estimator: str = "reinforce",
    seed: int = 1,
    lr: float = 3e-4,
    test_elbo: float | None = -100.0,
    bound: float | None = -95.0,
    steps: int = 20,
    basket: tuple[str, ...] = (),
    bias: bool = False,
    error: str | None = None,
) -> Path:
    d.mkdir(parents=True)
    config = {
        "seed": seed,
        "device": "auto",
        "model": {"_target_": "models.sbn.SBN", "name": model, "layers": list(layers)},
        "estimator": {"name": estimator, "n_samples": 1},
        "optim": {"name": "adam", "lr": lr},
        "train": {"steps": steps, "batch_size": 100},
        "data": {"name": "binarized_mnist", "root": f"/d{seed}"},
        "eval": {"samples": 100},
        "variance": {"every": 10, "basket": list(basket)},
        "logger": {"mode": "disabled"},
        "git_rev": f"abc{seed}",
    }
    if error:  # a job that failed before train.py wrote anything: Hydra's copy of the config, error.txt
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (d / "error.txt").write_text(f"{error}\noverrides: ...\n\nTraceback ...\n")
        return d
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    recs = []
    for step in range(0, steps + 1, 10):
        rec = {
            "step": step,
            "val/elbo": test_elbo + step / 10 - seed if test_elbo else -200.0 + step,
            "time/elapsed": step * 0.5 * seed,
        }
        recs.append(rec)
        if step < steps:
            g = {
                f"grad/{estimator}/log10_var": 2.0 - step / 10 + seed,
                f"grad/{estimator}/log10_var_rec": 1.0,
            }
            for b in basket:
                g.update({f"grad/{b}/log10_var": 1.0 - step / 20, f"grad/{b}/log10_var_rec": 0.5})
            if bias:
                g.update({f"bias/{n}/z2": 1.0 + 9 * (n == "st") for n in (estimator, *basket)})
            recs.append({"step": step, **g})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if test_elbo is not None:
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "model": model,
                    "estimator": estimator,
                    "seed": seed,
                    "test/elbo": test_elbo,
                    "test/bound_100": bound,
                }
            )
        )
        (d / "DONE").write_text("finished\n")
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    s = tmp_path / "sweep"
    n = 0
    for layers in ((200,), (200, 200)):
        for est, base in (("reinforce", -110.0), ("muprop", -100.0)):
            for seed in (1, 2, 3):
                make_run(
                    s / f"{n}_sbn_{est}_s{seed}",
                    layers=layers,
                    estimator=est,
                    seed=seed,
                    test_elbo=base - len(layers) - seed,
                    bound=base + 5 - len(layers) - seed,
                )
                n += 1
    make_run(s / f"{n}_sbn_st_s1", estimator="st", error="ConfigError: boom")
    make_run(s / f"{n + 1}_sbn_reinforce_s9", estimator="reinforce", seed=9, test_elbo=None)  # killed mid-way
    return s


def test_report_tables_plots_html(sweep, tmp_path):
    out = tmp_path / "rep"
    result = report.write_report([sweep], out)
    assert len(result["runs"]) == 14
    status = {r.path.name: r.status for r in result["runs"]}
    assert status["12_sbn_st_s1"] == "failed" and status["13_sbn_reinforce_s9"] == "incomplete"

    rows = {"sbn (layers=[200])", "sbn (layers=[200, 200])"}
    assert {r for r, _ in result["groups"]} == rows
    elbo = next(t for t in result["tables"] if t.key == "test/elbo")
    # -ELBO, mean ± sample std over the three seeds; the unfinished run adds nothing to the table
    vals = [110 + 1 + s for s in (1, 2, 3)]
    assert elbo.stats("sbn (layers=[200])", "reinforce") == pytest.approx((statistics.fmean(vals), 1.0, 3))
    md = (out / "report.md").read_text()
    assert "| model | muprop | reinforce | st |" in md
    assert f"| sbn (layers=[200]) | {100 + 1 + 2:.2f} ± 1.00 (3) | {110 + 1 + 2:.2f} ± 1.00 (3) | – |" in md
    assert "negative bounds in nats" in md and "test/bound_100" in md
    assert "ConfigError: boom" in md and "incomplete" in md

    with open(out / "table_test_bound_100.csv") as f:
        table = list(csv.DictReader(f))
    row = next(r for r in table if r["model"] == "sbn (layers=[200, 200])")
    assert float(row["muprop mean"]) == pytest.approx(-(-100 + 5 - 2 - 2)) and row["muprop n"] == "3"

    for name in ("val_elbo_step", "val_elbo_time", "grad_log10_var"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    assert not (out / "trajectory.png").exists()  # no basket, no bias in these runs
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and not re.search(r'src="(?!data:)', page)
    assert "<table>" in page and "ConfigError: boom" in page


def test_seeds_are_averaged_only_over_the_seed(tmp_path):
    """Runs differing in another key (here the learning rate) are different columns, named by that key."""
    for seed in (1, 2):
        for lr in (1e-3, 1e-4):
            make_run(tmp_path / "s" / f"r_{seed}_{lr}", lr=lr, seed=seed)
    groups = report.label_runs([report.load_run(d) for d in report.find_runs([tmp_path / "s"])])
    assert sorted(c for _, c in groups) == ["reinforce (optim.lr=0.0001)", "reinforce (optim.lr=0.001)"]
    assert all(len(runs) == 2 for runs in groups.values())


def test_trajectory_plot_and_cli(tmp_path, capsys):
    for seed in (1, 2):
        make_run(
            tmp_path / "t" / f"run{seed}",
            estimator="reinforce_ma",
            seed=seed,
            basket=("reinforce", "st"),
            bias=True,
        )
    report.main([str(tmp_path / "t"), "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "trajectory.png").read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "| sbn | 100.00 ± 0.00 (2) |" in printed and "2 runs (2 done)" in printed


def test_report_logs_a_wandb_table_offline(sweep, tmp_path):
    out = tmp_path / "rep"
    result = report.write_report([sweep], out)
    wdir = report.log_to_wandb(result, "offline", "gradest", "sweep")
    recs = wandb_files.read_records(next(wdir.glob("run-*.wandb")))
    assert wandb_files.run_info(recs)["job_type"] == "report"
    rows = wandb_files.history(recs)
    # W&B stores a logged object as flat keys <key>/_type, <key>/nrows, ...
    merged = {k: v for r in rows for k, v in r.items()}
    for key in ("report/test/elbo", "report/test/bound_100"):
        assert (
            merged[f"{key}/_type"] == "table-file" and merged[f"{key}/nrows"] == 4
        )  # 2 models x 2 estimators
    assert merged["report/val_elbo_step/_type"] == "image-file"


def test_no_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no run directories"):
        report.write_report([tmp_path / "empty"], tmp_path / "rep")
