"""Entry point: ``python run.py model=sbn estimator=reinforce``; ``-m`` sweeps. See README.md."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runners.checks import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from data.common import DataError  # noqa: PLC0415 - after Hydra has parsed the command line
    from runners.train import DONE, SUMMARY, train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if (run_dir / DONE).exists():
        print(f"already finished: {run_dir} (delete {run_dir / DONE} to run again)")
        return None
    try:
        summary = train(cfg, run_dir)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(2)
        raise
    m = int(cfg.eval.samples)
    print(f"\ntest ELBO {summary['test/elbo']:.2f} nats, test bound (m={m}) {summary[f'test/bound_{m}']:.2f} nats")
    print(f"run directory: {run_dir}  ({SUMMARY}, metrics.jsonl, checkpoint.pt)")
    if summary.get("wandb_sync"):
        print(f"upload to W&B: {summary['wandb_sync']}")
    return summary


if __name__ == "__main__":
    main()
