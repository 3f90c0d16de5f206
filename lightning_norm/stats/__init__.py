"""Statistics core (plain PyTorch): running moments, subsampled percentiles, rank reduction.

* :class:`~lightning_norm.stats.moments.Moments` -- count/mean/m2 states that merge exactly
  across micro-batches and ranks (Chan et al.), accumulated in float32;
* :class:`~lightning_norm.stats.quantiles.Subsampler` and
  :func:`~lightning_norm.stats.quantiles.percentiles` -- fixed, seeded subsamples and NaN-aware
  percentiles on the device;
* :func:`~lightning_norm.stats.distributed.gather_stack` -- one all-gather per logged step.
"""

from lightning_norm.stats.distributed import gather_stack, world_size
from lightning_norm.stats.moments import Moments, Scratch, as_accumulation_dtype
from lightning_norm.stats.quantiles import DEFAULT_QUANTILES, Subsampler, percentiles

__all__ = [
    "DEFAULT_QUANTILES",
    "Moments",
    "Scratch",
    "Subsampler",
    "as_accumulation_dtype",
    "gather_stack",
    "percentiles",
    "world_size",
]
