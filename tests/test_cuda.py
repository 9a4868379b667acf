"""Every model with every estimator that serves it, a few steps on CUDA (skipped without a GPU; run by
bench/gpu_check.sh on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from runners.checks import CONF_DIR, available, target_class

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def pairs() -> list[tuple[str, str]]:
    out = []
    for model in available("model"):
        kind = target_class(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"), model).latent_kind
        for est in available("estimator"):
            cls = target_class(OmegaConf.load(CONF_DIR / "estimator" / f"{est}.yaml"), est)
            if kind in cls.supports:
                out.append((model, est))
    return out


@pytest.mark.parametrize("model,estimator", pairs())
def test_trains_on_cuda(tiny_cfg, tmp_path, model, estimator):
    from runners.train import train

    extra = ["data=synthetic"] if model == "mixture_svi" else []
    cfg = tiny_cfg(f"model={model}", f"estimator={estimator}", "device=cuda", *extra)
    summary = train(cfg, tmp_path)
    assert all(isinstance(v, float) for k, v in summary.items() if k.startswith("test/"))


@pytest.mark.parametrize("estimator", ["muprop_c", "nvil", "st", "darn"])
def test_packed_on_cuda_matches_alone(tiny_cfg, tmp_path, estimator):
    """A pack of three on CUDA: each member's CUDA RNG stream is its own (a member logs what it logs alone)."""
    from runners.train import Job, train, train_pack

    cfgs = [
        tiny_cfg(f"estimator={estimator}", "device=cuda", f"seed={s}", f"optim.lr={lr}")
        for s, lr in ((1, 1e-3), (2, 3e-3), (3, 1e-4))
    ]
    results = train_pack([Job(c, tmp_path / "pack" / str(i)) for i, c in enumerate(cfgs)])
    alone = train(cfgs[1], tmp_path / "alone")
    assert isinstance(results[1], dict), results[1]
    assert results[1]["test/elbo"] == pytest.approx(alone["test/elbo"], rel=1e-5)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_on_cuda_follows_eager(tiny_cfg, tmp_path, mode):
    """train.compile on CUDA (reduce-overhead: CUDA graphs): the same trajectory as eager, rounding apart."""
    from runners.train import train

    common = ("estimator=muprop_c", "device=cuda", "train.steps=6", "model.layers=[16]")
    compiled = train(tiny_cfg(*common, f"train.compile={mode}"), tmp_path / "c")
    eager = train(tiny_cfg(*common), tmp_path / "e")
    for key in ("test/elbo", "val/elbo", "train/elbo"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), key
