"""Bad commands are refused with a message that says what is wrong and what is allowed, exit status 2, no
traceback, and nothing loaded or trained: ``python run.py ...`` in a subprocess, as a user would type it.

Every command points ``data.root`` at a folder that does not exist with downloads off: had any data been
loaded, the message would be a DataError about missing files instead of the expected one. The last case
checks that a DataError itself is reported the same clean way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/gradest-data"


def run_env() -> dict[str, str]:
    """The test process's environment, with a bytecode cache (imports are most of a run's time here) and one
    torch thread per process."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("HYDRA_FULL_ERROR", None)
    # an in-process wandb.init earlier in the session exports the address of this process's W&B service;
    # a child must start its own (through ours, a killed run's id would still be "in use" on resume)
    env.pop("WANDB_SERVICE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "gradest-pycache"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_py(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def have(group: str, name: str) -> bool:
    return (ROOT / "conf" / group / f"{name}.yaml").exists()


# (id, arguments, strings the message must contain)
CASES = [
    (
        "unknown-estimator",
        ["estimator=foo"],
        ["unknown estimator 'foo'", "choose one of:", "reinforce", "reinforce_ma"],
    ),
    ("unknown-model", ["model=nope"], ["unknown model 'nope'", "sbn", "vae"]),
    ("unknown-preset", ["experiment=nope"], ["unknown experiment 'nope'", "choose one of:"]),
    ("unknown-in-sweep", ["-m", "estimator=reinforce,foo"], ["unknown estimator 'foo'", "reinforce_ma"]),
    ("unknown-data", ["data=cifar"], ["unknown data 'cifar'", "binarized_mnist"]),
    ("negative-lr", ["optim.lr=-0.1"], ["optim.lr=-0.1 is out of range", "> 0"]),
    ("zero-eval-samples", ["eval.samples=0"], ["eval.samples=0 is out of range", ">= 1"]),
    ("one-variance-sample", ["variance.samples=1"], ["variance.samples=1 is out of range", ">= 2"]),
    ("zero-batch", ["train.batch_size=0"], ["train.batch_size=0 is out of range", ">= 1"]),
    ("negative-steps", ["train.steps=-5"], ["train.steps=-5 is out of range", ">= 0"]),
    (
        "bad-decay",
        ["estimator=reinforce_ma", "estimator.decay=1.5"],
        ["estimator.decay=1.5 is out of range", "[0, 1)"],
    ),
    ("bad-logger-mode", ["logger.mode=sometimes"], ["logger.mode='sometimes' is out of range", "offline"]),
    ("bad-device", ["device=gpu7"], ["device='gpu7' is out of range", "cuda:N"]),
    (
        "zero-components",
        ["model=mixture_vae", "estimator=implicit_mixture", "model.components=0"],
        ["model.components=0 is out of range", "an integer >= 1"],
    ),
    (
        "estimator-cannot-serve",
        ["model=sbn", "estimator=reparam"],
        [
            "estimator 'reparam' cannot serve model 'sbn'",
            "bernoulli latents",
            "Estimators that can:",
            "reinforce",
        ],
    ),
    (
        "muprop-on-mixture",
        ["model=mixture_vae", "estimator=muprop"],
        ["estimator 'muprop' cannot serve model 'mixture_vae'", "mixture latents", "Estimators that can:"],
    ),
    (
        "basket-cannot-serve",
        ["model=sbn", "estimator=reinforce", "variance.basket=[reparam]"],
        ["variance.basket[reparam] 'reparam' cannot serve model 'sbn'"],
    ),
    (
        "loo-needs-two-samples",
        ["estimator=reinforce_loo", "estimator.n_samples=1"],
        ["estimator.n_samples=1 is out of range", ">= 2"],
    ),
    (
        "biased-bias-reference",
        ["runner=trajectory", "variance.bias.reference=st"],
        ["variance.bias.reference='st' is a biased estimator", "Unbiased estimators for this model:"],
    ),
]
CASES += [
    ("layers-not-a-list", ["model.layers=200"], ["model.layers=200 is not a list", "model.layers=[200]"]),
    ("betas-one-number", ["optim.betas=[0.9]"], ["optim.betas=", "two numbers in [0, 1)"]),
    ("betas-not-a-list", ["optim.betas=0.9"], ["optim.betas=0.9 is not a list: write optim.betas=[0.9]"]),
    ("nonlinear-maybe", ["model.nonlinear=maybe"], ["model.nonlinear='maybe' is not true or false"]),
    ("steps-a-word", ["train.steps=many"], ["train.steps='many' is not a number"]),
    ("basket-not-a-list", ["variance.basket=reinforce"], ["variance.basket='reinforce' is not a list"]),
    (
        "synthetic-for-sbn",
        ["data=synthetic"],
        ["reads images but data 'synthetic' provides none", "data=binarized_mnist"],
    ),
    (
        "mps-absent",
        ["device=mps"],
        ["device='mps' but MPS (Apple GPU) is not available", "device=auto or cpu"],
    ),
    ("cuda-absent", ["device=cuda:3"], ["device='cuda:3'"]),
]
NEEDS = {
    "zero-components": ("model", "mixture_vae"),
    "muprop-on-mixture": ("model", "mixture_vae"),
    "loo-needs-two-samples": ("estimator", "reinforce_loo"),
    "biased-bias-reference": ("estimator", "st"),
}


@pytest.mark.parametrize("args,expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_command_is_refused(tmp_path, request, args, expected):
    need = NEEDS.get(request.node.callspec.id)
    if need and not have(*need):
        pytest.skip(f"conf/{need[0]}/{need[1]}.yaml not in this checkout")
    run_dir = tmp_path / "run"
    where = f"hydra.sweep.dir={tmp_path / 'sweep'}" if "-m" in args else f"hydra.run.dir={run_dir}"
    proc = run_py([*args, f"data.root={MISSING}", "data.download=false", "logger=disabled", where])
    if "-m" not in args:  # a sweep's jobs would each fail; the pre-check refuses it before any job
        assert proc.returncode == 2, proc.stderr
    else:
        assert proc.returncode == 2 and not (tmp_path / "sweep").exists(), proc.stderr
    err = proc.stderr
    assert err.startswith("error: ") or "\nerror: " in err, err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"
    assert "Traceback" not in err and "DataError" not in err and "Set the environment variable" not in err, (
        err
    )
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.jsonl").exists()


def test_missing_data_is_a_clean_error(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_py(
        [
            f"data.root={tmp_path / 'no-data'}",
            "data.download=false",
            "logger=disabled",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "data.root" in proc.stderr  # the message says how to point the runner at the data
    assert not run_dir.exists()  # a refused run leaves no folder behind (Hydra made it for this command only)


def test_empty_data_root_is_refused(tmp_path):
    proc = run_py(["data.root=", "logger=disabled", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2 and proc.stderr.startswith("error: data.root is empty"), proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_run_directory_that_cannot_be_made(tmp_path, where):
    target = tmp_path / "afile"
    target.write_text("x")
    run_dir = target if where == "file" else target / "run"
    proc = run_py([f"data.root={MISSING}", "logger=disabled", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2 and proc.stderr.startswith("error: hydra.run.dir="), proc.stderr
    assert "is a file" in proc.stderr or "is an existing file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_slurm_launcher_without_slurm(tmp_path):
    import shutil

    if shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    proc = run_py(["-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 's'}", "logger=disabled"])
    assert proc.returncode == 2 and "hydra/launcher=slurm needs SLURM" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_data_is_named(tiny_cfg, tmp_path, monkeypatch):
    """As root, file permissions do not stop reads: the PermissionError is raised by a patched reader."""
    from pathlib import Path as P

    from data.common import DataError
    from runners.train import build

    real = P.read_bytes

    def denied(self):
        if self.name.startswith("binarized_mnist"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(P, "read_bytes", denied)
    with pytest.raises(DataError, match="cannot read .*binarized_mnist.*permission denied"):
        build(tiny_cfg())


def test_a_model_named_alone_brings_an_estimator_that_serves_it():
    from runners.checks import with_model_defaults

    assert set(with_model_defaults(["model=mixture_svi"])) == {
        "model=mixture_svi",
        "estimator=implicit_mixture",
        "data=synthetic",
    }
    assert with_model_defaults(["model=mixture_vae", "estimator=mixture_score"]) == [
        "model=mixture_vae",
        "estimator=mixture_score",
    ]  # the user's choice wins
    assert with_model_defaults(["model=sbn"]) == ["model=sbn"]
    assert with_model_defaults(["experiment=mixture_vae", "model=mixture_vae"]) == [
        "experiment=mixture_vae",
        "model=mixture_vae",
    ]


def test_model_alone_on_the_command_line_runs(tmp_path):
    proc = run_py(
        [
            "model=mixture_svi",
            "train.steps=2",
            "eval.samples=2",
            "variance.every=0",
            "logger=disabled",
            "quiet=true",
            "data.n_eval=4",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "DONE").exists()
