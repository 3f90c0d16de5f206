"""Lightning plugins: :class:`NormSync`, layer synchronization for lightning_norm's layers."""

from lightning_norm.plugins.norm_sync import NormSync

__all__ = ["NormSync"]
