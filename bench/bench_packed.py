"""Packed runs measured: member-steps per second of M members of SBN 200-784, packed vs separate runs.

    python bench/bench_packed.py [--members 1,4,16,64,256] [--device cpu|cuda] [--reps 3] [--threads 1]

For issue 8 ("choose the mechanism by measurement"), in one run, for MuProp-C and NVIL (B = 100, Adam, a
learning rate per member), the runner's own members (``runners.train.open_member`` on the Table 3 preset):

* **separate runs**: each member taking its steps alone, as M single runs would (minus process start-up:
  separate processes are slower still, by the build time printed first plus the imports);
* **packed, one at a time** (``train.member_dim=false``, the default): the members in lock step, one step
  each per round, each on its own RNG stream, as ``train_pack`` (``hydra/launcher=packed``) trains them;
* **packed, member dimension** (``train.member_dim=true``): each round one pass for all M members, with
  their parameters and moving averages stacked ``[M, ...]`` (models/members.py: ``baddbmm`` over members,
  CORL's ``VectorizedLinear``), each member's rows drawn on its own stream, then each member's own optimiser;
* **torch.func.vmap** over the real model and estimator (``stack_module_state`` + ``functional_call``): tried
  and reported; MuProp's mean-field derivative calls ``torch.autograd.grad``, which ``vmap`` does not support,
  and the estimators' running statistics are updated in place.

Prints member-steps/s and the ratios to separate runs, measured in one run: each packed mode is timed in pairs
with separate runs, in alternating order, and the ratio is the median (and range) of the per-pair ratios, so
that a drifting load on a shared machine falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

X, H, B = 784, 200, 100  # SBN 200-784, batch 100


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
    from runners.train import _groups, _round

    stop = GracefulStop()

    def step() -> None:
        if packed:
            for _ in range(rounds):
                for group in _groups(members):
                    _round(group, stop, swap=len(members) > 1)
        else:
            for mm in members:
                for _ in range(rounds):
                    _round([mm], stop, swap=False)

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
    head = "| estimator | M | separate runs | packed, one at a time | ÷ separate | packed, member dimension | ÷ separate |"
    print("\nmember-steps per second\n\n" + head)
    print("|---" * (head.count("|") - 1) + "|")
    for kind in a.estimators.split(","):
        for m in [int(s) for s in a.members.split(",")]:
            rounds = max(1, a.min_steps // m)
            row = f"| {kind} | {m} |"
            alone = runner_members(kind, m, device, tmp / "data", tmp / "alone")
            for i in range(2):  # one at a time: the same members in lock step; then with a member dimension
                members = (
                    alone
                    if i == 0
                    else runner_members(kind, m, device, tmp / "data", tmp / "md", ("train.member_dim=true",))
                )
                sep, pk, ratios = paired(
                    runner_step_fn(alone, False, rounds), runner_step_fn(members, True, rounds), a.reps
                )
                spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
                if i == 0:
                    row += f" {m * rounds / sep:,.0f} |"
                # the pair ratio is time(separate) / time(packed): > 1 is packed faster
                row += f" {m * rounds / pk:,.0f} | {statistics.median(ratios):.2f}{spread} |"
                del members
            del alone
            print(row, flush=True)
    for kind in a.estimators.split(","):
        print(f"\ntorch.func vmap(grad) over the real SBN + {kind}: {try_vmap(kind, device)}")


if __name__ == "__main__":
    main()
