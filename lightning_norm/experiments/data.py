"""Data for the S18 setups: embedded digits (default), CIFAR-10 (opt-in), the DLN regression.

- :class:`DigitsDataModule`: scikit-learn's ``load_digits`` (1,797 grey 8x8 handwritten digits
  that ship inside scikit-learn, so nothing is downloaded). Why this default: on it the S18
  effect shows in seconds on a CPU (measured in ``docs/reproduce.md``: a 4-conv VGG-like net at
  lr 0.1, batch 128 reaches ~98% train accuracy in ~30 steps with BN and needs ~200 without).
- :class:`CIFAR10DataModule`: torchvision's CIFAR-10, S18's data set, for full-size runs.
- :class:`DLNDataModule`: S18 App. A.1's deep-linear-network regression, ``y = A x`` with
  ``A`` 10 x 10 and 1,000 inputs, all i.i.d. standard Gaussian, served as one full batch.

No augmentation anywhere (S18 trains without it).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_norm.errors import ConfigurationError

#: Per-channel mean and std of the CIFAR-10 training images (RGB, images in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _train_loader(ds: TensorDataset, batch_size: int, seed: int, name: str) -> DataLoader:
    if batch_size > len(ds):
        raise ConfigurationError(
            f"batch_size={batch_size} exceeds the {len(ds)} training samples of {name}; "
            f"pass a batch size of at most {len(ds)}."
        )
    # drop_last keeps every step's batch the same size, so BN statistics are comparable
    # across steps; the seeded generator makes the sample order reproducible.
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def load_digits_tensors(size: int = 8) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(N, 1, size, size)`` float32 images in [0, 1] and labels.

    Args:
        size: side length; 8 is the native resolution, larger values upsample bilinearly.

    Raises:
        ConfigurationError: scikit-learn is not installed, or ``size < 8``.
    """
    if size < 8:
        raise ConfigurationError(f"size must be >= 8 (the digits are 8x8), got {size}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "The default data set needs scikit-learn (it ships the digits images): "
            "`pip install scikit-learn`, or pass --dataset cifar10 --data-dir DIR."
        ) from err
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, y


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 8x8 digits, split once into train/validation, standardized by train stats.

    Args:
        batch_size: training batch size (S18: 128).
        size: image side; 8 (native) or larger (bilinear upsampling) for deeper VGG configs.
        val_fraction: share of the 1,797 images held out for validation.
        seed: seeds the split and the training-batch order.

    Raises:
        ConfigurationError: ``val_fraction`` outside (0, 1), or (at ``setup``) scikit-learn
            missing or ``batch_size`` larger than the training split.

    Example::

        dm = DigitsDataModule(batch_size=128)
        trainer.fit(S18Classifier(norm="noisy_bn"), datamodule=dm)
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self, batch_size: int = 128, size: int = 8, val_fraction: float = 0.15, seed: int = 0
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ConfigurationError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size, self.size = batch_size, size
        self.val_fraction, self.seed = val_fraction, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.size)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(len(x) * self.val_fraction)
        tr, va = perm[n_val:], perm[:n_val]
        mean, std = x[tr].mean(), x[tr].std()
        x = (x - mean) / std
        self.train_set = TensorDataset(x[tr], y[tr])
        self.val_set = TensorDataset(x[va], y[va])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return _train_loader(self.train_set, self.batch_size, self.seed, "the digits data set")

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=512)


class CIFAR10DataModule(L.LightningDataModule):
    """torchvision's CIFAR-10 (S18's data), normalized per channel, no augmentation.

    Args:
        data_dir: folder holding (or receiving) ``cifar-10-batches-py``.
        download: fetch the data set if it is missing (off by default: nothing is downloaded
            unless asked).
        batch_size: training batch size (S18: 128).
        num_workers: DataLoader workers.
        seed: seeds the training-batch order.

    Raises:
        ConfigurationError: torchvision is not installed, or the data is missing and
            ``download`` is off (at ``prepare_data``/``setup``).

    Example::

        dm = CIFAR10DataModule("~/data", download=True)
    """

    num_classes = 10
    in_channels = 3

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir, self.download = data_dir, download
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set = self.val_set = None

    @staticmethod
    def _torchvision():
        try:
            import torchvision
        except ImportError as err:
            raise ConfigurationError(
                "--dataset cifar10 needs torchvision, which is not installed: "
                "`pip install torchvision` (the CPU wheel is enough), or use the default "
                "--dataset digits."
            ) from err
        return torchvision

    def _dataset(self, train: bool):
        tv = self._torchvision()
        tf = tv.transforms.Compose(
            [tv.transforms.ToTensor(), tv.transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        )
        try:
            return tv.datasets.CIFAR10(
                self.data_dir, train=train, transform=tf, download=self.download
            )
        except RuntimeError as err:
            raise ConfigurationError(
                f"CIFAR-10 not found in {self.data_dir!r}: pass --download to fetch it "
                f"(about 170 MB), or --data-dir pointing at a folder with cifar-10-batches-py."
            ) from err

    def prepare_data(self) -> None:
        self._dataset(train=True)
        self._dataset(train=False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self._dataset(True), self._dataset(False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000, num_workers=self.num_workers)


def dln_tensors(num_samples: int = 1000, width: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """S18 App. A.1's regression data: ``x ~ N(0, I)``, ``y = A x`` with ``A_ij ~ N(0, 1)``.

    Returns:
        ``(x, y)``, both ``(num_samples, width)`` float32.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(width, width, generator=g)
    x = torch.randn(num_samples, width, generator=g)
    return x, x @ a.T


class DLNDataModule(L.LightningDataModule):
    """The deep-linear-network task, one full batch per step (full-batch gradient descent).

    Args:
        num_samples: inputs (S18: 1,000).
        width: input/output size (S18: 10).
        seed: seeds ``A`` and the inputs.

    Example::

        trainer.fit(DLNRegression(norm="batchnorm"), datamodule=DLNDataModule())
    """

    def __init__(self, num_samples: int = 1000, width: int = 10, seed: int = 0) -> None:
        super().__init__()
        if num_samples < 2 or width < 1:
            raise ConfigurationError(
                f"num_samples must be >= 2 and width >= 1, got {num_samples}, {width}."
            )
        self.num_samples, self.width, self.seed = num_samples, width, seed

    def train_dataloader(self) -> DataLoader:
        x, y = dln_tensors(self.num_samples, self.width, self.seed)
        return DataLoader(TensorDataset(x, y), batch_size=self.num_samples)
