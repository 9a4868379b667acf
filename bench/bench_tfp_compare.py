"""Compare ``DiagNormalMixture.rsample`` + backward with TensorFlow Probability's mixture (JAX).

TensorFlow Probability and JAX are NOT project dependencies: run this from a separate throwaway environment
with torch, jax and tensorflow-probability (its JAX substrate needs no TensorFlow), with the project on the
path, e.g. (tensorflow-probability 0.25.0 does not import with jax 0.10; 0.4.35 works)

    python3.11 -m venv /tmp/tfpenv
    /tmp/tfpenv/bin/pip install torch numpy omegaconf "jax==0.4.35" "jaxlib==0.4.35" \
        tensorflow-probability==0.25.0
    /tmp/tfpenv/bin/python bench/bench_tfp_compare.py            # issue grid, 1 thread each

All columns come from one process and one run. Each draws B = 256 samples of one mixture (K components,
D dims, no batch shape) and takes the gradient of sum(x^2) with respect to logits, loc and scale, float32,
CPU. ``ours`` is ``DiagNormalMixture(logits, loc, scale).rsample((B,))`` + ``torch.autograd.grad`` (torch,
``--threads`` threads); ``floor`` is a plain torch ``Normal(loc[0], scale[0])`` rsample + backward of the same
[B, D]; ``tfp`` is ``jax.jit(jax.grad(loss, argnums=(0, 1, 2)))`` of
``loss(a, mu, sigma, key) = sum(MixtureSameFamily(Categorical(logits=a), components,
reparameterize=True).sample(B, seed=key)^2)`` with ``components = Independent(Normal(mu, sigma), 1)``
(TFP's distributional transform handles factorized components only: with ``MultivariateNormalDiag``
components the reparameterized sample raises NotImplementedError, ``_is_increasing`` of its bijector).
TFP's gradient is the same implicit reparameterization (Figurnov et al. 2018) as ours, but it forms the
[B, D, D] Jacobian of the distributional transform by D vector-Jacobian products (vmapped, intermediates of
B K D^2 floats) and solves it densely: configurations whose [D, B, K, D] float32 intermediate exceeds
``--tfp-max-gb`` are reported as n/a instead of risking the machine's memory. Fed the same x (through its
``_reparameterize_sample``), TFP's per-sample gradients for logits, loc and scale equal ours
(``component_grad="implicit"``) to float32 rounding, so the columns time one estimator.

Timing: torch columns are the median of ``torch.utils.benchmark`` blocked_autorange; the TFP column is the
median of single calls (each with a fresh key folded in inside the jitted function, ``block_until_ready``
on the gradients) over at least ``--min-run-time`` seconds and at least 5 calls, after two warm-up calls
outside the median. The first of them compiles (unless the shape was compiled earlier in the run: the
repeated (10, 2), (10, 16), (2, 128) rows) and is printed as ``TFP 1st call ms``. JAX is held to one CPU
thread by setting, before jax is imported,
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``; the footer prints the
largest process-CPU-time / wall-time ratio over the TFP timing loops (about 1 means one thread).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.mixture_peers import Case, median_ms
from bench.mixture_peers import parser as peer_parser  # noqa: E402

GRID = [(k, d) for d in (1, 2, 16, 128, 512) for k in (1, 2, 10, 100)] + [
    (10, 2),
    (10, 16),
    (10, 64),
    (50, 16),
    (2, 128),
]


def jax_median_ms(fn, args, min_run_time: float) -> tuple[float, float, float]:
    """(first call ms incl. compile, median ms per call, process CPU time / wall time of the timed loop)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args, np.uint32(0)))
    first_ms = 1e3 * (time.perf_counter() - t0)
    jax.block_until_ready(fn(*args, np.uint32(1)))  # second warm-up, outside the median
    times = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    i = 2
    while time.perf_counter() - wall0 < min_run_time or len(times) < 5:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args, np.uint32(i)))
        times.append(time.perf_counter() - t)
        i += 1
    cpu_ratio = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return first_ms, 1e3 * statistics.median(times), cpu_ratio


def make_tfp_grad(b: int):
    import jax
    import jax.numpy as jnp
    from tensorflow_probability.substrates import jax as tfp

    tfd = tfp.distributions

    def loss(a, mu, sigma, key):
        mix = tfd.MixtureSameFamily(
            tfd.Categorical(logits=a),
            tfd.Independent(tfd.Normal(mu, sigma), reinterpreted_batch_ndims=1),
            reparameterize=True,
        )
        return jnp.sum(jnp.square(mix.sample(b, seed=key)))  # x: [B, D]

    grad = jax.grad(loss, argnums=(0, 1, 2))

    @jax.jit
    def step(a, mu, sigma, base_key, i):
        return grad(a, mu, sigma, jax.random.fold_in(base_key, i))

    return step


def main() -> None:
    parser = peer_parser(__doc__)
    parser.add_argument(
        "--tfp-max-gb",
        type=float,
        default=3.0,
        help="skip TFP where its [D, B, K, D] float32 Jacobian intermediate exceeds this (GB)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = GRID
    if args.only:
        grid = [tuple(int(v) for v in item.split("x")) for item in args.only.split(",")]

    import jax
    import tensorflow_probability as tfp_pkg

    b = 256
    step = make_tfp_grad(b)
    base_key = jax.random.PRNGKey(0)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    print(
        f"# torch {torch.__version__} ({torch.get_num_threads()} thread(s)), jax {jax.__version__}, "
        f"tensorflow-probability {tfp_pkg.__version__}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}"
    )
    print(
        f"# B = {b}, float32, CPU, {os.cpu_count()} CPUs; median ms of rsample + backward of sum(x^2); "
        f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
    )
    print()
    print("| K | D | ours ms | TFP ms | floor ms | ours/TFP | ours/floor | TFP 1st call ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    cpu_ratios = []
    for k, d in grid:
        case = Case(k, d, b)
        logits, loc, scale = case.params
        t_ours = median_ms(case.ours, args.min_run_time)
        t_floor = median_ms(case.floor, args.min_run_time)

        jac_gb = 4 * d * b * k * d / 1e9
        t_tfp = first_ms = float("nan")
        if jac_gb > args.tfp_max_gb:
            notes.append(f"K={k} D={d}: TFP n/a, its Jacobian intermediate is {jac_gb:.1f} GB > --tfp-max-gb")
        else:
            jargs = tuple(jax.numpy.asarray(t.detach().numpy()) for t in (logits, loc, scale)) + (base_key,)
            try:
                first_ms, t_tfp, cpu_ratio = jax_median_ms(step, jargs, args.min_run_time)
                cpu_ratios.append(cpu_ratio)
            except Exception as exc:  # report, keep going
                notes.append(f"K={k} D={d}: TFP n/a, {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        ok = t_tfp == t_tfp
        tfp_txt = f"{t_tfp:.3f}" if ok else "n/a"
        ratio_txt = f"{t_ours / t_tfp:.3g}" if ok else "n/a"
        first_txt = f"{first_ms:.0f}" if ok else "n/a"
        print(
            f"| {k} | {d} | {t_ours:.3f} | {tfp_txt} | {t_floor:.3f} | {ratio_txt} | "
            f"{t_ours / t_floor:.1f} | {first_txt} |",
            flush=True,
        )
    load_end = os.getloadavg()
    print()
    for note in notes:
        print(f"# {note}")
    if cpu_ratios:
        print(f"# TFP timing loops: largest process CPU time / wall time {max(cpu_ratios):.2f}")
    print(f"# load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")


if __name__ == "__main__":
    main()
