"""When a measurement runs: every N optimizer steps, optionally log-spaced.

Training dynamics change fastest at the start, so a log-spaced schedule measures densely early
and sparsely late while staying a pure function of the step (identical on every DDP rank, and
after a resume).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_norm.errors import ConfigurationError


@dataclass(frozen=True)
class StepSchedule:
    """Decides whether the measurement runs at optimizer step ``step`` (``trainer.global_step``).

    Linear (default): due when ``step % every_n_steps == 0``.

    Log-spaced (``log_spaced=True``): the interval doubles every octave of steps, so each octave
    gets about ``points_per_octave`` measurements. With ``N = every_n_steps`` and
    ``P = points_per_octave``, the interval at step ``s`` is ``N`` for ``s < P * N`` and
    ``N * 2**j`` for ``P * N * 2**j <= s < P * N * 2**(j+1)``; the step is due when it is a
    multiple of its interval. Example (N=1, P=10): 0, 1, ..., 19, 20, 22, ..., 38, 40, 44, ...,
    76, 80, 88, ...

    Args:
        every_n_steps: the smallest interval between two measurements, in optimizer steps (>= 1).
        log_spaced: double the interval every octave of steps.
        points_per_octave: measurements per doubling of the step count when log-spaced (>= 1).

    Raises:
        ConfigurationError: ``every_n_steps`` or ``points_per_octave`` is not a positive int.
    """

    every_n_steps: int = 1
    log_spaced: bool = False
    points_per_octave: int = 10

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "points_per_octave"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"`{name}` must be a positive integer (number of optimizer steps), got "
                    f"{value!r}. Pass e.g. {name}=1 to measure at every step."
                )

    def interval(self, step: int) -> int:
        """The interval (in optimizer steps) in force at ``step``."""
        n = self.every_n_steps
        if not self.log_spaced:
            return n
        octave_len = self.points_per_octave * n
        if step < octave_len:
            return n
        j = (step // octave_len).bit_length() - 1
        return n << j

    def is_due(self, step: int) -> bool:
        """Whether the measurement runs at optimizer step ``step``."""
        return step >= 0 and step % self.interval(step) == 0

    __call__ = is_due
