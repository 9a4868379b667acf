"""Packed runs measured: member-steps per second of M members of SBN 200-784, packed vs separate runs.

    python bench/bench_packed.py [--members 1,4,16,64,256] [--device cpu|cuda] [--reps 3] [--threads 1]

For issue 8 ("choose the mechanism by measurement"), in one run, for MuProp-C and NVIL (B = 100, Adam):

* **separate runs**: the runner's own members (``runners.train.open_member`` on the Table 3 preset), each
  taking its steps alone, as M single runs would (minus process start-up: separate processes are slower
  still, by the build time printed first plus the imports);
* **packed (runner)**: the same members in lock step, one step each per round, each on its own RNG stream,
  exactly as ``train_pack`` (``hydra/launcher=packed``) trains them;
* **member-dim prototype**: the same arithmetic with every weight carrying a leading member dimension
  ``[M, in, out]`` and ``baddbmm`` over members (CORL's ``VectorizedLinear``), per-member moving averages,
  VN statistics and IDB nets, and a member-wise Adam with a learning rate per member, written out in this
  file for the measurement only: the mechanism the runner does not use (on CPU it loses from M = 64);
* **torch.func.vmap** over the real model and estimator (``stack_module_state`` + ``functional_call``): tried
  and reported; MuProp's mean-field derivative calls ``torch.autograd.grad``, which ``vmap`` does not support,
  and the estimators' running statistics are updated in place.

Both estimators do what the runner's step does: MuProp-C = mean-field pass + ``autograd.grad`` for f'(z̄) +
one stochastic pass + centred residual; NVIL = one stochastic pass + moving-average and input-dependent
baselines + variance normalisation. Prints member-steps/s and packed ÷ separate, measured in one run; separate and packed repetitions come in
pairs, in alternating order, and the ratio is the median (and range) of the per-pair ratios, so that a drifting load on a
shared machine falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

X, H, B, IDB_H = 784, 200, 100, 100  # SBN 200-784, batch 100, NVIL's IDB net 784-100-1


# --------------------------------------------------------------------------------------------------
# packed: every parameter [M, ...]
# --------------------------------------------------------------------------------------------------


def bern_logp(logits: Tensor, z: Tensor) -> Tensor:
    """log Bernoulli(z; sigmoid(logits)) summed over the last dim; z may be a mean-field value in [0, 1]."""
    return -F.binary_cross_entropy_with_logits(logits, z, reduction="none").sum(-1)


class PackedSBN:
    def __init__(self, m: int, device: torch.device, idb: bool):
        g = torch.Generator().manual_seed(0)

        def p(*shape, scale=0.01):
            return (torch.randn(m, *shape, generator=g) * scale).to(device).requires_grad_(True)

        self.params = {
            "enc_w": p(X, H),
            "enc_b": p(1, H),
            "dec_w": p(H, X),
            "dec_b": p(1, X),
            "prior": p(1, H),
        }
        if idb:
            self.params.update(idb_w1=p(X, IDB_H), idb_b1=p(1, IDB_H), idb_w2=p(IDB_H, 1), idb_b2=p(1, 1))
        self.m = m

    def q_logits(self, xc: Tensor) -> Tensor:  # [M, B, X] -> [M, B, H]
        return torch.baddbmm(self.params["enc_b"], xc, self.params["enc_w"])

    def cost(self, x: Tensor, ql: Tensor, z: Tensor) -> Tensor:  # -> [M, B] negative ELBO
        p = self.params
        px = torch.baddbmm(p["dec_b"], z, p["dec_w"])  # [M, B, X]
        return bern_logp(ql, z) - bern_logp(p["prior"].expand_as(z), z) - bern_logp(px, x)

    def idb(self, xc: Tensor) -> Tensor:  # [M, B]
        p = self.params
        h = torch.tanh(torch.baddbmm(p["idb_b1"], xc, p["idb_w1"]))
        return torch.baddbmm(p["idb_b2"], h, p["idb_w2"]).squeeze(-1)


class PackedAdam:
    """Adam over [M, ...] tensors with a learning rate per member ([M])."""

    def __init__(self, params: list[Tensor], lr: Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, *betas, eps, 0
        self.m = [torch.zeros_like(q) for q in params]
        self.v = [torch.zeros_like(q) for q in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for q, m, v in zip(self.params, self.m, self.v):
            m.mul_(self.b1).add_(q.grad, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(q.grad, q.grad, value=1 - self.b2)
            lr = self.lr.view(-1, *([1] * (q.dim() - 1)))  # [M, 1, ...]
            q.sub_(lr / c1 * m / ((v / c2).sqrt() + self.eps))
            q.grad = None


def packed_step_fn(kind: str, m: int, device: torch.device):
    model = PackedSBN(m, device, idb=kind == "nvil")
    opt = PackedAdam(list(model.params.values()), torch.full((m,), 3e-4, device=device))
    ma = torch.zeros(m, device=device)  # [M] moving-average baseline per member
    var = torch.ones(m, device=device)  # [M] VN running variance per member
    x_all = torch.bernoulli(torch.full((m, 1000, X), 0.3, device=device))  # [M, N, X] data on the device
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        nonlocal ma, var
        idx = torch.randint(0, 1000, (m, B), device=device, generator=gen)  # [M, B] own minibatch per member
        x = torch.gather(x_all, 1, idx.unsqueeze(-1).expand(m, B, X))  # [M, B, X]
        xc = x - 0.3
        ql = model.q_logits(xc)  # [M, B, H]
        if kind == "muprop_c":
            z_bar = torch.sigmoid(ql).detach().requires_grad_(True)  # mean-field point
            f_bar = model.cost(x, ql.detach(), z_bar)  # [M, B]
            (fp,) = torch.autograd.grad(f_bar.sum(), z_bar)  # [M, B, H] f'(z_bar), per example and member
            z = torch.bernoulli(torch.sigmoid(ql.detach()), generator=gen)  # [M, B, H]
            f = model.cost(x, ql, z)  # [M, B]
            r = f.detach() - f_bar.detach() - (fp * (z - z_bar.detach())).sum(-1)  # [M, B]
            adv = r - ma[:, None]
            ma = 0.9 * ma + 0.1 * r.mean(1)
            logq = bern_logp(ql, z)
            mu_fp = (torch.sigmoid(ql) * fp).sum(-1)
            surrogate = (
                (f + logq * adv + mu_fp).mean(1).sum()
            )  # per-member means, summed: members independent
        else:  # nvil: LR-C-VN-IDB
            z = torch.bernoulli(torch.sigmoid(ql.detach()), generator=gen)
            f = model.cost(x, ql, z)
            base = model.idb(xc)  # [M, B]
            r = f.detach() - ma[:, None]
            ma = 0.9 * ma + 0.1 * f.detach().mean(1)
            var = 0.9 * var + 0.1 * (r - base.detach()).var(1)
            adv = (r - base.detach()) / torch.clamp(var.sqrt(), min=1.0)[:, None]
            logq = bern_logp(ql, z)
            surrogate = (f + logq * adv + (r - base) ** 2).mean(1).sum()
        surrogate.backward()
        opt.step()

    return step


# --------------------------------------------------------------------------------------------------
# the runner: train_pack's members (runners/train.py), in lock step vs each alone
# --------------------------------------------------------------------------------------------------


def runner_members(
    kind: str,
    m: int,
    device: torch.device,
    root: Path,
    tmp: Path,
    extra: tuple[str, ...] = (),
    experiment: str = "muprop_table3_sbn_1layer",
) -> list:
    """M members of an experiment preset (default: Table 3's SBN 200-784) as the runner builds them
    (``open_member``), seeds 1..M, Adam at a learning rate per member; evaluation, variance and checkpoints off
    (the step alone is timed); ``extra``: more overrides (bench_compile.py: ``train.compile=...``)."""
    from hydra import compose, initialize_config_dir

    from runners.train import Job, open_member

    cache: dict = {}
    members = []
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        for i in range(m):
            cfg = compose(
                "config",
                overrides=[
                    f"experiment={experiment}",
                    f"estimator={kind}",
                    "optim=adam",
                    f"optim.lr={3e-4 * (1 + i % 5)}",
                    f"seed={i + 1}",
                    f"data.root={root}",
                    "data.verify=false",
                    "train.steps=100000000",
                    "train.eval_every=100000000",
                    "train.checkpoint_every=100000000",
                    "variance.every=0",
                    "logger.mode=disabled",
                    "quiet=true",
                    f"device={device}",
                    *extra,
                ],
            )
            members.append(open_member(i, Job(cfg, tmp / f"{experiment}_{kind}{m}_{i}"), cache))
    return members


def runner_step_fn(members: list, packed: bool, rounds: int):
    """packed: ``rounds`` lock-step rounds, each member one step on its own RNG stream (``_turn`` swaps it in),
    as ``train_pack`` runs a pack; separate: each member ``rounds`` steps in a row with nothing swapped, as its
    single run would (process start-up, imports and data loading of separate runs are not counted)."""
    from runners.interrupt import GracefulStop
    from runners.train import _advance, _turn

    stop = GracefulStop()

    def step() -> None:
        if packed:
            for _ in range(rounds):
                for mm in members:
                    with _turn(mm, swap=len(members) > 1):
                        _advance(mm, stop)
        else:
            for mm in members:
                for _ in range(rounds):
                    with _turn(mm, swap=False):
                        _advance(mm, stop)

    return step


def try_vmap(kind: str, device: torch.device) -> str:
    """torch.func over the real model and estimator: does it run at all?"""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch.func import functional_call, grad, stack_module_state, vmap

    from models.sbn import SBN

    class CostOf(torch.nn.Module):  # functional_call calls forward: the model's cost is its forward here
        def __init__(self) -> None:
            super().__init__()
            self.m = SBN(x_dim=X, layers=[H])

        def forward(self, x, sample, n):
            return self.m.cost(x, sample, n)

    models = [CostOf().to(device) for _ in range(2)]
    est = instantiate(OmegaConf.load(ROOT / "conf" / "estimator" / f"{kind}.yaml"), context_dim=X).to(device)
    params, buffers = stack_module_state(models)
    x = torch.bernoulli(torch.full((2, B, X), 0.3, device=device))

    def loss(p, b, xm):
        def cost_fn(sample, n):
            return functional_call(models[0], (p, b), (xm, sample, n))

        return est(cost_fn, xm).surrogate

    try:
        vmap(grad(loss), randomness="different")(params, buffers, x)
        return "runs"
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def timed(step, reps: int) -> float:
    step()  # warm-up (allocations, first-call overheads)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired(step_a, step_b, reps: int) -> tuple[float, float, list[float]]:
    """Times of a and b in pairs, in the order a b, b a, a b, ... (so that a drifting load and any cost of
    going first or second fall on both alike): (median time of a, median time of b, time_a / time_b per pair)."""
    step_a()  # warm-up (allocations, first-call overheads)
    step_b()
    ta, tb = [], []
    for rep in range(reps):
        order = ((step_a, ta), (step_b, tb))
        for step, times in order if rep % 2 == 0 else order[::-1]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), [a / b for a, b in zip(ta, tb)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", default="1,4,16,64,256")
    ap.add_argument("--estimators", default="muprop_c,nvil")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-steps", type=int, default=64, help="member-steps per timed repetition (at least)")
    ap.add_argument("--no-member-dim", action="store_true", help="skip the member-dimension prototype")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    import tempfile

    from tests.datafiles import write_binarized_mnist

    tmp = Path(tempfile.mkdtemp(prefix="bench_packed_"))
    write_binarized_mnist(tmp / "data")  # tiny files in the real format: the step does not depend on N
    print(
        f"device {device}, {a.threads} thread(s), torch {torch.__version__}; SBN 200-784 (Table 3 preset), "
        f"B = {B}, Adam, a learning rate per member; median of {a.reps} repetitions of >= {a.min_steps} member-steps; packed ÷ separate: the median (range) of "
        f"the ratios of {a.reps} alternated pairs"
    )
    t0 = time.perf_counter()
    runner_members("nvil", 1, device, tmp / "data", tmp)
    print(
        f"building one run (config, data load, model, estimator, optimiser) in a warm process: "
        f"{time.perf_counter() - t0:.2f} s; a separate process also pays Python + torch imports"
    )
    head = "| estimator | M | separate runs | packed (runner) | packed ÷ separate |"
    if not a.no_member_dim:
        head += " member-dim prototype | prototype ÷ separate |"
    print("\nmember-steps per second\n\n" + head)
    print("|---" * (head.count("|") - 1) + "|")
    for kind in a.estimators.split(","):
        for m in [int(s) for s in a.members.split(",")]:
            rounds = max(1, a.min_steps // m)
            members = runner_members(kind, m, device, tmp / "data", tmp)
            sep, pk, ratios = paired(
                runner_step_fn(members, False, rounds), runner_step_fn(members, True, rounds), a.reps
            )
            s_rate, p_rate = m * rounds / sep, m * rounds / pk
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
            row = (
                f"| {kind} | {m} | {s_rate:,.0f} | {p_rate:,.0f} | {statistics.median(ratios):.2f}{spread} |"
            )
            del members
            if not a.no_member_dim:
                proto = packed_step_fn(kind, m, device)
                d_rate = m * rounds / timed(lambda p=proto, r=rounds: [p() for _ in range(r)], a.reps)
                row += f" {d_rate:,.0f} | {d_rate / s_rate:.2f} |"
            print(row, flush=True)
    for kind in a.estimators.split(","):
        print(f"\ntorch.func vmap(grad) over the real SBN + {kind}: {try_vmap(kind, device)}")


if __name__ == "__main__":
    main()
