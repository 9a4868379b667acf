"""The reproduction command end to end on tiny files: it runs the sweep, writes the table with the paper's
number beside ours for every cell, and a re-run finishes an interrupted reproduction instead of starting over."""

from __future__ import annotations

import csv
import shutil

import pytest

from runners import reproduce

pytestmark = pytest.mark.slow


def test_reproduce_writes_both_columns_and_resumes(tiny_data_root, tmp_path, capfd):
    sweeps, out = tmp_path / "sweeps", tmp_path / "results"
    argv = [
        "muprop_table3",
        "--rows", "sbn_1layer",
        "--estimators", "st,darn",
        "--steps", "4",
        "--seeds", "1,2",
        "--lrs", "1e-3,3e-4",
        "--data-root", str(tiny_data_root),
        "--sweep-root", str(sweeps),
        "--out", str(out),
        "--logger", "disabled",
        "--eval-samples", "3",
        "data.verify=false", "train.batch_size=8", "train.eval_every=2", "eval.batch_size=5",
        "variance.every=0", "device=cpu",
    ]  # fmt: skip
    reproduce.main(argv)
    md = (out / "muprop_table3.md").read_text()
    assert "| SBN 200-784 | ST |" in md and "| 129.4 |" in md and "| 112.4 |" in md  # the paper's column
    assert "Command: `python -m runners.reproduce muprop_table3" in md and "Steps per run: 4" in md
    assert "ST is the worst" in md  # the claims are checked under the table
    rows = list(
        csv.DictReader(line for line in (out / "muprop_table3.csv").open() if not line.startswith("#"))
    )
    assert {r["estimator"] for r in rows} == {"st", "darn"}
    assert all(r["seeds"] == "2" and r["lr"] in ("0.001", "0.0003") for r in rows)
    # beside the metric: the m = 3 importance-weighted bound (mean ± std over the seeds) and ms per step
    assert all(
        r["bound_m"] == "3" and float(r["bound_std"]) >= 0 and float(r["ms_per_step"]) > 0 for r in rows
    )
    assert "| bound (m) | ms/step |" in md and " (3) | " in md
    assert (out / "muprop_table3_sbn_1layer.png").exists()

    # an interrupted reproduction: one job lost its end (as if killed after its last checkpoint)
    jobs = sorted(p for p in (sweeps / "muprop_table3" / "sbn_1layer").iterdir() if p.is_dir())
    assert len(jobs) == 8  # 2 estimators x 2 seeds x 2 learning rates
    (jobs[0] / "DONE").unlink()
    (jobs[0] / "summary.json").unlink()
    capfd.readouterr()
    reproduce.main(argv)
    assert (jobs[0] / "DONE").exists()
    assert (out / "muprop_table3.md").read_text().count("| SBN 200-784 |") == 2

    # job folders are named by their values, so a re-run with another seed list finds its finished runs
    # (a sweep number would have shifted) and the table reports only the seeds asked for
    assert {p.name for p in jobs} >= {"sbn_st_lr0.001_s1", "sbn_darn_lr0.0003_s2"}
    capfd.readouterr()
    reproduce.main([a if a != "1,2" else "2" for a in argv])
    assert capfd.readouterr().out.count("already finished") == 4
    assert sorted(p for p in (sweeps / "muprop_table3" / "sbn_1layer").iterdir() if p.is_dir()) == jobs
    rows = list(
        csv.DictReader(line for line in (out / "muprop_table3.csv").open() if not line.startswith("#"))
    )
    assert rows and all(r["seeds"] == "1" for r in rows)

    # a folder of an earlier sweep (named by job number) holding a job that a value-named folder also holds:
    # counted once
    shutil.copytree(jobs[0], jobs[0].parent / "0_sbn_darn_s1")
    reproduce.main([*argv, "--report-only"])
    assert "each job is counted once" in capfd.readouterr().err
    rows = list(
        csv.DictReader(line for line in (out / "muprop_table3.csv").open() if not line.startswith("#"))
    )
    assert all(r["seeds"] == "2" for r in rows)


def test_reproduce_through_the_packed_launcher(tiny_data_root, tmp_path):
    """``--launcher packed``: the row's jobs train as members of one process and the table is written."""
    out = tmp_path / "results"
    argv = [
        "muprop_table3", "--launcher", "packed", "--rows", "sbn_1layer", "--estimators", "st",
        "--steps", "4", "--seeds", "1,2", "--lrs", "1e-3", "--data-root", str(tiny_data_root),
        "--sweep-root", str(tmp_path / "sweeps"), "--out", str(out), "--logger", "disabled",
        "--eval-samples", "3", "data.verify=false", "train.batch_size=8", "train.eval_every=2",
        "eval.batch_size=5", "variance.every=0", "device=cpu",
    ]  # fmt: skip
    reproduce.main(argv)
    md = (out / "muprop_table3.md").read_text()
    assert "--launcher packed" in md and "| SBN 200-784 | ST |" in md and "| 2 |" in md  # both seeds finished


def test_graves2016_rows_run_and_report(tiny_data_root, tmp_path):
    out = tmp_path / "results"
    reproduce.main(
        [
            "graves2016",
            "--rows", "vae_k2,svi_ring",
            "--estimators", "graves_mixture,mixture_exact",
            "--steps", "3",
            "--seeds", "1",
            "--data-root", str(tiny_data_root),
            "--sweep-root", str(tmp_path / "sweeps"),
            "--out", str(out),
            "--logger", "disabled",
            "--eval-samples", "3",
            "data.verify=false", "train.batch_size=8", "train.eval_every=2", "eval.batch_size=5",
            "variance.every=0", "device=cpu", "model.latent_dim=2",
        ]
    )  # fmt: skip
    md = (out / "graves2016.md").read_text()
    assert "| VAE, mixture posterior K = 2 | exact marginalisation |" in md
    assert "| SVI, 2-D ring (K = 8) | Graves (sampled component) |" in md
    assert "Graves 2016 runs no experiment" in md
    rows = list(csv.DictReader(line for line in (out / "graves2016.csv").open() if not line.startswith("#")))
    assert len(rows) == 4 and all(r["seeds"] == "1" for r in rows)
    # the m-sample bound beside the VAE rows' ELBO; none beside the SVI rows' KL (it is no bound)
    for r in rows:
        assert r["bound_m"] == ("3" if r["model"].startswith("VAE") else ""), r


@pytest.mark.parametrize(
    "argv, message",
    [
        (["muprop_table3", "--rows", "sbn_9layer"], "unknown row(s) sbn_9layer of muprop_table3"),
        (["muprop_table3", "--seeds", "1,2,1"], "--seeds lists a value twice: 1,2,1"),
        (["muprop_table3", "--lrs", "1e-3,0.001"], "--lrs lists a value twice"),
        (["muprop_table3", "--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_reproduction_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        reproduce.parse(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_rate_with_unfinished_seeds_is_shown_partial_only_when_no_rate_is_complete(tmp_path):
    def job(seed, lr, val, done=True):
        summary = {"val/elbo": -val, "test/elbo": -val - 1.0, "train_seconds": 2.0} if done else None
        return reproduce.Job("nvil", seed, lr, 4, tmp_path, summary, None)

    partial = [job(1, 1e-3, 100.0), job(2, 1e-3, 0.0, done=False)]
    cell = reproduce.choose(partial, "nvil", "test/elbo")
    assert cell.partial and cell.lr == 1e-3 and cell.values == [101.0] and cell.unfinished == 1
    assert cell.sec_per_step == [0.5]
    # a complete rate wins over a partial one, even a worse one
    cell = reproduce.choose([*partial, job(1, 3e-4, 120.0), job(2, 3e-4, 122.0)], "nvil", "test/elbo")
    assert not cell.partial and cell.lr == 3e-4 and cell.values == [121.0, 123.0]
