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


@pytest.mark.parametrize("member_dim", [False, True], ids=["one-at-a-time", "member-dim"])
@pytest.mark.parametrize("estimator", ["muprop_c", "nvil", "st", "darn"])
def test_packed_on_cuda_matches_alone(tiny_cfg, tmp_path, estimator, member_dim):
    """A pack of three on CUDA: each member's CUDA RNG stream is its own (a member logs what it logs alone),
    also stepped with a member dimension (train.member_dim: MuProp-C and NVIL; ST and DARN step alone)."""
    from runners.train import Job, train, train_pack

    def cfg(seed: int, lr: float, *more: str):
        return tiny_cfg(f"estimator={estimator}", "device=cuda", f"seed={seed}", f"optim.lr={lr}", *more)

    jobs = [
        Job(cfg(s, lr, f"train.member_dim={member_dim}"), tmp_path / "pack" / str(i))
        for i, (s, lr) in enumerate(((1, 1e-3), (2, 3e-3), (3, 1e-4)))
    ]
    results = train_pack(jobs)
    alone = train(cfg(2, 3e-3), tmp_path / "alone")
    assert isinstance(results[1], dict), results[1]
    # bmm where a single run has addmm: float32 rounding apart
    assert results[1]["test/elbo"] == pytest.approx(alone["test/elbo"], rel=1e-3 if member_dim else 1e-5)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_on_cuda_follows_eager(tiny_cfg, tmp_path, mode):
    """train.compile on CUDA (reduce-overhead: CUDA graphs): the same trajectory as eager, rounding apart."""
    from runners.train import train

    common = ("estimator=muprop_c", "device=cuda", "train.steps=6", "model.layers=[16]")
    compiled = train(tiny_cfg(*common, f"train.compile={mode}"), tmp_path / "c")
    eager = train(tiny_cfg(*common), tmp_path / "e")
    for key in ("test/elbo", "val/elbo", "train/elbo"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), key
