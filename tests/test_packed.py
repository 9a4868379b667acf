"""Packed runs (runners/pack.py, runners/train.py ``train_pack``): many jobs of a sweep in one process.

What is checked, with the real loop on tiny files (CPU):
(a) independence: member j's objective has exactly zero gradient with respect to member i's parameters, and
    member j's steps leave member i's parameters, estimator state and RNG stream bit for bit untouched;
(b) equivalence: a member of a pack and the same job run alone (a pack of one) log the same metrics;
(c) a packed sweep killed (SIGTERM) and re-run resumes every member with no repeated and no missing step;
(d) one member that diverges is stopped and reported in its own error.txt while the others finish;
and the packed sweep leaves job folders with exactly the files of the basic launcher's, which the report,
resume and skip read unchanged.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from runners.logger import read_metrics
from tests.test_bad_input import run_py
from tests.test_robustness import WAIT_S, ckpt_step, n_lines, start, train_steps, wait_for

#: metrics that measure time, not the computation: the only ones allowed to differ
TIMING = ("time/elapsed",)


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


def sweep_args(root: Path, sweep_dir: Path, *extra: str, steps: int = 6) -> list[str]:
    return [
        "-m",
        "hydra/launcher=packed",
        f"data.root={root}",
        "data.verify=false",
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.log_every=1",
        "train.eval_every=3",
        "eval.samples=3",
        "eval.batch_size=5",
        "variance.every=3",
        "variance.samples=3",
        "model.layers=[16]",
        "logger.mode=disabled",
        "quiet=true",
        "device=cpu",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------------
# (a) + (b) in process
# ---------------------------------------------------------------------------------------------------

MEMBERS = [  # different seeds, learning rates, estimators with state (moving averages, IDB nets), optimisers
    ("estimator=nvil", "seed=1", "optim.lr=1e-3"),
    ("estimator=nvil", "seed=2", "optim.lr=3e-3"),
    ("estimator=muprop_c", "seed=1", "optim=sgd", "optim.lr=1e-2"),
    ("estimator=reinforce_ma", "seed=3", "optim.lr=3e-4", "data=mnist_dynamic"),  # fresh pixels from the RNG
]


def test_a_member_of_a_pack_is_its_single_run(tiny_cfg, tmp_path):
    from runners.train import Job, train, train_pack

    common = ("train.steps=7", "train.eval_every=3", "variance.every=3", "model.layers=[16]")
    jobs = [Job(tiny_cfg(*common, *m), tmp_path / "pack" / str(i)) for i, m in enumerate(MEMBERS)]
    results = train_pack(jobs)
    assert all(isinstance(r, dict) for r in results), results
    for i, m in enumerate(MEMBERS):
        alone = train(tiny_cfg(*common, *m), tmp_path / "alone" / str(i))
        packed = records(jobs[i].run_dir)
        assert any("grad/" in k for r in packed for k in r) and any("val/elbo" in r for r in packed)
        assert packed == records(tmp_path / "alone" / str(i)), m  # every metric of every step, exactly
        for key in ("test/elbo", "test/bound_3", "val/elbo", "train/elbo"):
            assert results[i][key] == alone[key], (m, key)
        a = torch.load(jobs[i].run_dir / "checkpoint.pt", weights_only=True)
        b = torch.load(tmp_path / "alone" / str(i) / "checkpoint.pt", weights_only=True)
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]), (m, k)


def test_members_are_independent(tiny_cfg, tmp_path):
    """Member j's objective does not reach member i's parameters; its steps change nothing of member i."""
    from runners.interrupt import GracefulStop
    from runners.train import Job, _round, _turn, open_member

    members = [
        open_member(i, Job(tiny_cfg(*m, "model.layers=[16]"), tmp_path / str(i)), {})
        for i, m in enumerate(MEMBERS[:3])
    ]
    try:
        for j, mj in enumerate(members):
            x = mj.train_split.sample_batch(8, torch.Generator().manual_seed(0))
            with _turn(mj, swap=True):
                est = mj.run.estimator(mj.run.model.cost_fn(x), mj.run.model.context(x))
            for i, mi in enumerate(members):
                if i == j:
                    continue
                params = [*mi.run.model.parameters(), *mi.run.estimator.parameters()]
                grads = torch.autograd.grad(est.surrogate, params, allow_unused=True, retain_graph=True)
                assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), (i, j)
        # steps of members 1 and 2 leave member 0 bit for bit as it was
        m0 = members[0]
        before = {
            k: v.clone() for k, v in {**m0.run.model.state_dict(), **m0.run.estimator.state_dict()}.items()
        }
        rng_before = m0.rng["torch"].clone()
        with GracefulStop() as stop:
            for m in members[1:]:
                for _ in range(3):
                    _round([m], stop, swap=True)
        after = {**m0.run.model.state_dict(), **m0.run.estimator.state_dict()}
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(rng_before, m0.rng["torch"])
        assert members[1].step == 3 and m0.step == 0
    finally:
        for m in members:
            m.close(0)


# ---------------------------------------------------------------------------------------------------
# the same with a member dimension (train.member_dim: models/members.py)
# ---------------------------------------------------------------------------------------------------

MEMBER_DIM = [  # stepped together: the SBN with the estimators that declare member_dim, own seeds and optimisers
    ("estimator=nvil", "seed=1", "optim.lr=1e-3"),
    ("estimator=nvil", "seed=2", "optim=sgd", "optim.lr=1e-2"),
    ("estimator=nvil", "seed=3", "optim.lr=3e-3", "data=mnist_dynamic"),  # stepped alone: other data
    ("estimator=muprop_c", "seed=1", "optim.lr=3e-3"),
    ("estimator=muprop_c", "seed=4", "optim.lr=1e-3", "optim.betas=[0.5,0.9]"),
    ("estimator=muprop_c_vn", "seed=1"),
    ("estimator=muprop_c_vn", "seed=2"),
    ("estimator=muprop_c_idb", "seed=1"),
    ("estimator=muprop_c_idb", "seed=5", "optim.lr=3e-3"),
    ("estimator=st", "seed=1"),
    ("estimator=st", "seed=2", "optim.lr=3e-3"),
    ("estimator=darn", "seed=1"),
    ("estimator=darn", "seed=2", "optim=sgd", "optim.lr=1e-2"),
    ("estimator=st_annealed", "seed=1"),  # a slope schedule (reads the step): steps alone
    ("estimator=st_annealed", "seed=2"),
    ("estimator=arm", "seed=1"),  # no member dimension: steps alone
    ("estimator=muprop_c", "seed=6", "model.nonlinear=true", "model.hidden=8"),  # two tanh layers per map
    ("estimator=muprop_c", "seed=7", "model.nonlinear=true", "model.hidden=8", "optim.lr=3e-3"),
]


def close_records(a: list[dict], b: list[dict], what) -> None:
    """Every metric of every logged step equal to float32 rounding (the member dimension multiplies by
    ``bmm`` where a single run uses ``addmm``)."""
    assert [r.keys() for r in a] == [r.keys() for r in b], what
    for ra, rb in zip(a, b):
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-4, nan_ok=True), (what, ra["step"], k)
            else:
                assert ra[k] == rb[k], (what, ra["step"], k)


def test_members_stepped_with_a_member_dimension_are_their_single_runs(tiny_cfg, tmp_path, monkeypatch):
    """(b) with ``train.member_dim=true``: each member logs its single run's metrics, and resumes like it."""
    import runners.train as train_mod
    from runners.train import Job, train, train_pack

    groups: list[int] = []
    real = train_mod._member_dim_gradients
    monkeypatch.setattr(train_mod, "_member_dim_gradients", lambda st: groups.append(len(st)) or real(st))
    common = ("train.eval_every=3", "variance.every=3", "model.layers=[16]", "train.member_dim=true")
    # 4 steps, then the same jobs re-run to 7: resumed from each member's checkpoint
    for steps in (4, 7):
        jobs = [
            Job(tiny_cfg(*common, f"train.steps={steps}", *m), tmp_path / "pack" / str(i))
            for i, m in enumerate(MEMBER_DIM)
        ]
        results = train_pack(jobs)
        assert all(isinstance(r, dict) for r in results), results
    # every round: one group per estimator config with >= 2 members on the same data
    assert set(groups) == {2} and len(groups) == 7 * 7
    for i, m in enumerate(MEMBER_DIM):
        alone = train(tiny_cfg(*common[:-1], "train.steps=7", *m), tmp_path / "alone" / str(i))
        close_records(records(jobs[i].run_dir), records(tmp_path / "alone" / str(i)), m)
        for key in ("test/elbo", "test/bound_3", "val/elbo", "train/elbo"):
            assert results[i][key] == pytest.approx(alone[key], rel=1e-4), (m, key)


def test_members_stepped_together_are_independent(tiny_cfg, tmp_path):
    """(a) and (d) with a member dimension: one member's parameters made NaN (diverged) change nothing of
    the others' steps, bit for bit, and that member alone fails, with its single run's error; the others go on."""
    from runners.interrupt import GracefulStop
    from runners.train import Job, _groups, _round, open_member

    def pack(name: str) -> list:
        return [
            open_member(i, Job(tiny_cfg(*m, "model.layers=[16]", "train.member_dim=true", "train.log_every=2"),
                               tmp_path / name / str(i)), {})
            for i, m in enumerate(MEMBER_DIM[3:5] + MEMBER_DIM[3:4])
        ]  # fmt: skip

    a, b = pack("a"), pack("b")
    with torch.no_grad():
        b[1].run.model.decoder[0].weight.fill_(float("nan"))
    try:
        with GracefulStop() as stop:
            for members in (a, b):
                for _ in range(2):
                    (group,) = _groups(members)
                    _round(group, stop, swap=True)
        for i in (0, 2):
            for (k, va), vb in zip(a[i].run.model.state_dict().items(), b[i].run.model.state_dict().values()):
                assert torch.equal(va, vb), (i, k)
            assert torch.equal(a[i].rng["torch"], b[i].rng["torch"]) and b[i].step == 2 and b[i].active
        # its own error, the one its single run raises (NaN probabilities at its draw): it alone stops
        assert "p_in" in str(b[1].error) and not b[1].active and b[1].step == 1  # NaN decoder, then all NaN
    finally:
        for m in a + b:
            m.close(0)


# ---------------------------------------------------------------------------------------------------
# the packed launcher, end to end (real processes)
# ---------------------------------------------------------------------------------------------------


def files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()} | {f".hydra/{p.name}" for p in (run_dir / ".hydra").iterdir()}


@pytest.mark.slow
def test_packed_sweep_leaves_single_run_folders(tiny_data_root, tmp_path):
    """One process trains the sweep; each job folder has the files a basic sweep's has, with the same numbers;
    a re-run skips every finished job; the report reads the folders."""
    grid = ["estimator=nvil,reinforce_ma", "seed=1,2", "logger.mode=offline"]
    packed = run_py(sweep_args(tiny_data_root, tmp_path / "packed", *grid))
    assert packed.returncode == 0, packed.stderr
    assert "Launching 4 jobs as 2 pack(s) in this process" in packed.stdout + packed.stderr
    basic = run_py([a for a in sweep_args(tiny_data_root, tmp_path / "basic", *grid) if "launcher" not in a])
    assert basic.returncode == 0, basic.stderr
    p_dirs = sorted(d for d in (tmp_path / "packed").iterdir() if d.is_dir())
    b_dirs = sorted(d for d in (tmp_path / "basic").iterdir() if d.is_dir())
    assert [d.name for d in p_dirs] == [d.name for d in b_dirs] and len(p_dirs) == 4
    for p, b in zip(p_dirs, b_dirs):
        assert files(p) == files(b), (p.name, files(p) ^ files(b))
        assert records(p) == records(b), p.name
        sp, sb = (json.loads((d / "summary.json").read_text()) for d in (p, b))
        assert sp["test/elbo"] == sb["test/elbo"] and sp["wandb_sync"].startswith("wandb sync ")
    again = run_py(sweep_args(tiny_data_root, tmp_path / "packed", *grid))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already finished") == 4, again.stdout
    from runners.report import main as report_main

    report_main([str(tmp_path / "packed"), "--out", str(tmp_path / "report")])
    assert any((tmp_path / "report").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,member_dim",
    [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGTERM, True)],
    ids=["SIGTERM", "SIGKILL", "SIGTERM-member-dim"],
)
def test_packed_sweep_killed_and_rerun_resumes_every_member(tiny_data_root, tmp_path, sig, member_dim):
    """SIGTERM: every member checkpoints where it is; SIGKILL: each member goes back to its last periodic
    checkpoint. Either way the re-run resumes every member with no repeated and no missing step (also with the
    members stepped together, train.member_dim)."""
    sweep = tmp_path / "s"
    args = sweep_args(
        tiny_data_root,
        sweep,
        f"train.member_dim={str(member_dim).lower()}",
        "estimator=reinforce_ma",
        "seed=1,2,3",
        "train.eval_every=100000",
        "train.checkpoint_every=7",
        "variance.every=0",
        steps=100_000,
    )
    proc = start(args)
    dirs = lambda: sorted(d for d in sweep.glob("*_s*") if d.is_dir())  # noqa: E731
    wait_for(lambda: len(dirs()) == 3 and all(n_lines(d) >= 20 for d in dirs()), "20 lines per member", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode in (128 + sig, -sig), err
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert "interrupted by SIGTERM" in err and "Traceback" not in err, err
    stopped = {d.name: ckpt_step(d) for d in dirs()}
    for d in dirs():
        assert not (d / "DONE").exists()
        if (
            sig == signal.SIGTERM
        ):  # each member checkpointed where it stopped; every step up to there logged once
            assert train_steps(d) == list(range(1, stopped[d.name] + 1)), d.name
        else:  # killed between checkpoints: the lines after the last checkpoint are cut on resume
            assert stopped[d.name] % 7 == 0 and train_steps(d)[: stopped[d.name]] == list(
                range(1, stopped[d.name] + 1)
            )
    total = max(stopped.values()) + 15
    done = run_py([a if not a.startswith("train.steps=") else f"train.steps={total}" for a in args])
    assert done.returncode == 0, done.stderr
    for d in dirs():
        assert f"resuming from {d / 'checkpoint.pt'} at step {stopped[d.name]}" in done.stdout
        assert train_steps(d) == list(range(1, total + 1)), d.name  # none lost, none repeated
        assert (d / "DONE").exists()


@pytest.mark.slow
def test_a_diverging_member_fails_alone(tiny_data_root, tmp_path):
    """... also when the pack is dealt over two worker processes side by side (hydra.launcher.n_jobs=2)."""
    sweep = tmp_path / "s"
    proc = run_py(
        sweep_args(
            tiny_data_root,
            sweep,
            "estimator=reinforce_ma",
            "optim.lr=1e-3,10000",
            "train.log_every=10",
            "hydra.launcher.n_jobs=2",
            steps=200,
        )
    )
    assert "Launching 2 jobs as 2 pack(s), 2 at a time in worker processes" in proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stderr
    ok, bad = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert (ok / "DONE").exists() and not (ok / "error.txt").exists()
    assert not (bad / "DONE").exists() and (bad / "error.txt").read_text().startswith("Diverged")
    assert "1 job(s) of the sweep" in proc.stderr and bad.name in proc.stderr and ok.name not in proc.stderr


@pytest.mark.slow
def test_a_member_with_a_bad_checkpoint_or_a_busy_folder_fails_alone(tiny_data_root, tmp_path):
    """One member's corrupt checkpoint, another's folder held by a running process: those two fail with one
    line each (nothing written into the busy folder), the third member trains to the end."""
    from runners.lock import RunLock

    sweep = tmp_path / "s"
    args = sweep_args(tiny_data_root, sweep, "estimator=reinforce_ma", "seed=1,2,3", steps=4)
    first = run_py(args)
    assert first.returncode == 0, first.stderr
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    for d in jobs:
        (d / "DONE").unlink()
    (jobs[0] / "checkpoint.pt").write_bytes(b"garbage")
    busy = RunLock(jobs[1])
    busy.acquire()
    before = sorted(p.name for p in jobs[1].iterdir())
    try:
        again = run_py([a.replace("train.steps=4", "train.steps=6") for a in args])
    finally:
        busy.release()
    assert again.returncode == 1, again.stderr
    # both are listed in the sweep's summary (the busy folder's job from a note in the sweep folder: nothing is
    # written into its own)
    assert "2 job(s) of the sweep" in again.stderr and jobs[1].name in again.stderr, again.stderr
    assert "cannot resume from" in (jobs[0] / "error.txt").read_text().splitlines()[0]
    assert "in use by pid" in again.stderr and sorted(p.name for p in jobs[1].iterdir()) == before
    assert (jobs[2] / "DONE").exists() and train_steps(jobs[2]) == list(range(1, 7))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "packed"])
def test_sigterm_during_a_sweeps_start_up_stops_it(tiny_data_root, tmp_path, launcher):
    """A SIGTERM that lands before training starts (imports, data, W&B) stops an in-process sweep at once; it is
    not held back until the sweep ends."""
    sweep = tmp_path / "s"
    args = sweep_args(tiny_data_root, sweep, "estimator=reinforce_ma", "seed=1,2", steps=100_000)
    if launcher == "basic":
        args = [a for a in args if "launcher" not in a]
    proc = start(args)
    wait_for(lambda: any(sweep.glob("*/.hydra")), "a job folder", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=WAIT_S)  # would time out if the signal were held until the end
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM)
    assert not any(sweep.glob("*/DONE"))


@pytest.mark.slow
def test_w_and_b_unreachable_sends_the_whole_pack_offline_once(tiny_data_root, tmp_path, monkeypatch):
    """logger.mode=online without network: the first member waits for the timeout and goes offline, the
    others go offline at once (one decision per process), and every member's offline run holds its steps."""
    from runners import wandb_files

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    sweep = tmp_path / "s"
    proc = run_py(
        sweep_args(tiny_data_root, sweep, "seed=1,2,3", "logger.mode=online", "logger.init_timeout=5")
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: W&B online did not start") == 1, proc.stderr
    assert proc.stderr.count("W&B online was unreachable earlier in this process") == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for d in sorted(p for p in sweep.iterdir() if p.is_dir()):
        (run_file,) = d.glob("wandb/offline-run-*/run-*.wandb")
        rows = wandb_files.history(wandb_files.read_records(run_file))
        assert [r["step"] for r in rows if "train/elbo" in r] == list(range(1, 7)), d.name
        assert (d / "DONE").exists()
