"""S18's deep linear network (App. A.1) as a LightningCLI: with and without BN, and with Lp.

Trains :class:`lightning_norm.experiments.DLNRegression` (25 square linear layers of width 10
fitting ``y = A x`` by full-batch gradient descent) with ICS and loss-landscape probes::

    python examples/s18_dln.py fit --config examples/configs/s18_dln.yaml --model.norm batchnorm

Variants: ``none``, ``batchnorm``, ``lp1``, ``lp2``, ``lpinf``. S18 trains 10,000 steps at lr
1e-6 (``--trainer.max_steps 10000 --model.lr 1e-6``); the config's 1,000 steps at lr 1e-4 train
both networks visibly in about a minute.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_norm.experiments import DLNDataModule, DLNRegression


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the CLI (``run=False`` only parses and instantiates, as the tests do)."""
    return LightningCLI(
        DLNRegression,
        DLNDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
