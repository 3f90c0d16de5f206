"""S18's VGG experiment as a LightningCLI: one normalization variant per run.

Trains :class:`lightning_norm.experiments.S18Classifier` (the VGG-like net, variants made by
surgery of its BN model) with lightning_norm's monitors and probes from a YAML config::

    python examples/s18_vgg.py fit --config examples/configs/s18_vgg.yaml --model.norm noisy_bn
    python examples/s18_vgg.py fit --config examples/configs/s18_vgg_cifar10.yaml  # S18 full size

Run it once per variant (``none``, ``batchnorm``, ``noisy_bn``, ``lp1``, ``lp2``, ``lpinf``,
``layernorm``, ``groupnorm``) with ``--trainer.logger.init_args.version <variant>``, then draw the
figures with ``lightning-norm report runs/s18_cli``. ``lightning-norm reproduce`` does all of this
in one command.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_norm.experiments import S18Classifier


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the CLI (``run=False`` only parses and instantiates, as the tests do)."""
    return LightningCLI(
        S18Classifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
