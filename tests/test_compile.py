"""``train.compile``: the step's estimate through ``torch.compile`` follows the eager trajectory (the same random
draws, float rounding apart), alone and as members of a pack; a value that is not a mode is refused."""

from __future__ import annotations

import math

import pytest

from runners.checks import ConfigError, check_ranges
from runners.logger import read_metrics

# MuProp-C: the hardest case, its mean-field derivative (autograd.grad) breaks the graph.
MEMBERS = [("estimator=muprop_c", "seed=1"), ("estimator=muprop_c", "seed=2", "optim.lr=3e-3")]
COMMON = ("train.steps=6", "train.eval_every=3", "variance.every=3", "model.layers=[16]")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) or (math.isnan(a) and math.isnan(b))


@pytest.mark.slow
def test_a_compiled_pack_follows_its_eager_single_runs(tiny_cfg, tmp_path):
    from runners.train import Job, train, train_pack

    jobs = [
        Job(tiny_cfg(*COMMON, *m, "train.compile=true"), tmp_path / "c" / str(i))
        for i, m in enumerate(MEMBERS)
    ]
    results = train_pack(jobs)
    assert all(isinstance(r, dict) for r in results), results
    for i, m in enumerate(MEMBERS):
        eager = train(tiny_cfg(*COMMON, *m), tmp_path / "e" / str(i))
        compiled = [
            {k: v for k, v in r.items() if k != "time/elapsed"} for r in read_metrics(jobs[i].run_dir)
        ]
        reference = [
            {k: v for k, v in r.items() if k != "time/elapsed"} for r in read_metrics(tmp_path / "e" / str(i))
        ]
        assert [sorted(r) for r in compiled] == [sorted(r) for r in reference], m
        for a, b in zip(compiled, reference):
            assert all(close(float(a[k]), float(b[k])) for k in a), (m, a, b)
        for key in ("test/elbo", "val/elbo", "train/elbo"):
            assert close(results[i][key], eager[key]), (m, key, results[i][key], eager[key])


@pytest.mark.parametrize("value", ["fast", "2", "reduce_overhead"])
def test_a_value_that_is_not_a_mode_is_refused(tiny_cfg, value):
    with pytest.raises(ConfigError, match=r"train\.compile"):
        check_ranges(tiny_cfg(f"train.compile={value}"))
