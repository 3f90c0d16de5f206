"""Read logged runs back: TensorBoard event files and W&B offline run files.

A *run* is one training run (one variant of one comparison). :func:`load_runs` finds every run
under a log directory:

- a directory holding ``events.out.tfevents.*`` files is a TensorBoard run, read record by record
  with TensorBoard's event-file loader (every scalar kept, no down-sampling). Its *group* is the
  parent directory relative to the log directory (``vgg`` for ``LOGDIR/vgg/batchnorm``), its
  *variant* the ``norm`` hyper-parameter of Lightning's ``hparams.yaml`` when present, else
  the directory name.
- a ``run-*.wandb`` file is a W&B offline run, parsed from its record log (the LevelDB-style
  log format W&B writes: 32 KiB blocks of CRC-framed chunks holding ``wandb_internal_pb2.Record``
  protobufs); group and variant come from the run's ``group`` and ``norm`` config (else its
  name). Scalars are plotted against ``trainer/global_step`` when the run logged it.

Where one run was logged to both (``lightning-norm reproduce --wandb`` does), the TensorBoard copy
is used and the W&B copy skipped.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_norm.errors import ConfigurationError

#: Step metric used as the x-axis for W&B runs (what Lightning's WandbLogger logs).
WANDB_STEP = "trainer/global_step"


@dataclass
class Run:
    """One run's scalars: ``scalars[tag] = (steps, values)``, both 1-D numpy arrays.

    Args:
        name: where the run came from, relative to the log directory.
        group: the comparison it belongs to (runs of one group are drawn together).
        variant: the normalization (``"batchnorm"``, ``"none"``, ...), or a run label.
        source: ``"tensorboard"`` or ``"wandb"``.
    """

    name: str
    group: str
    variant: str
    source: str
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def has(self, tag: str) -> bool:
        return tag in self.scalars and len(self.scalars[tag][0]) > 0

    def get(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of ``tag``, sorted by step (empty arrays if absent)."""
        return self.scalars.get(tag, (np.zeros(0), np.zeros(0)))

    def tags(self, prefix: str = "") -> list[str]:
        return sorted(t for t in self.scalars if t.startswith(prefix))


def _hparams_norm(run_dir: Path) -> str | None:
    path = run_dir / "hparams.yaml"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("norm:"):
            value = line.split(":", 1)[1].strip().strip("'\"")
            return value or None
    return None


def read_tensorboard_run(run_dir: str | os.PathLike, logdir: str | os.PathLike) -> Run:
    """Every scalar of the TensorBoard event files in ``run_dir`` (one run).

    Reads the event files record by record with TensorBoard's ``RawEventFileLoader`` (about
    twice as fast as ``EventAccumulator``, which also keeps every value here: no reservoir
    sampling). Scalars written as ``simple_value`` (``SummaryWriter.add_scalar``, Lightning's
    TensorBoardLogger) and as scalar-plugin tensors are both read. Files are read in name
    (= creation time) order and, where a resumed run repeats a step, the last value wins.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    run_dir, logdir = Path(run_dir), Path(logdir)
    series: dict[str, dict[int, float]] = defaultdict(dict)
    scalar_tensors: set[str] = set()
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for raw in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(raw)
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    series[value.tag][event.step] = float(value.simple_value)
                elif kind == "tensor":
                    # the plugin name travels only with a tag's first value
                    if value.metadata.plugin_data.plugin_name == "scalars":
                        scalar_tensors.add(value.tag)
                    if value.tag in scalar_tensors:
                        arr = tensor_util.make_ndarray(value.tensor)
                        if arr.size == 1:
                            series[value.tag][event.step] = float(arr.reshape(()))
    scalars = {}
    for tag, by_step in series.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        scalars[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    rel = run_dir.relative_to(logdir) if run_dir != logdir else Path(run_dir.name)
    group = str(rel.parent) if str(rel.parent) != "." else logdir.name
    variant = _hparams_norm(run_dir) or rel.name
    return Run(str(rel), group, variant, "tensorboard", scalars)


def _wandb_records(path: Path):
    """Yield the raw protobuf records of a W&B ``.wandb`` run file."""
    data = path.read_bytes()
    if len(data) < 7 or data[:4] != b":W&B":
        raise ConfigurationError(f"{path} is not a W&B run file (bad header).")
    block, header = 32768, 7
    pos, pending = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # the writer pads a block tail too short for a chunk header
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        pos += header
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""
        else:  # zero padding at the end of a file still being written
            break


def read_wandb_run(path: str | os.PathLike, logdir: str | os.PathLike) -> Run:
    """Scalars, group and name of a W&B offline run file (``run-<id>.wandb``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path, logdir = Path(path), Path(logdir)
    group, name, norm = "", path.stem, None
    rows: list[dict[str, float]] = []
    for raw in _wandb_records(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # a torn record at the end of a crashed run
            continue
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            group = rec.run.run_group or group
            name = rec.run.display_name or name
            for item in rec.run.config.update:
                if item.key == "norm" or list(item.nested_key) == ["norm"]:
                    norm = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    value = json.loads(item.value_json)
                except ValueError:
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = float(value)
            rows.append(row)
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        step = row.get(WANDB_STEP, row.get("_step"))
        if step is None or math.isnan(step):
            continue
        for key, value in row.items():
            if key.startswith("_") or key == WANDB_STEP:
                continue
            series[key][int(step)] = value
    scalars = {
        k: (np.array(sorted(v), dtype=np.int64), np.array([v[s] for s in sorted(v)], dtype=float))
        for k, v in series.items()
    }
    return Run(
        str(path.relative_to(logdir)),
        group or "wandb",
        str(norm) if norm is not None else name,
        "wandb",
        scalars,
    )


def load_runs(logdir: str | os.PathLike) -> list[Run]:
    """Every TensorBoard and W&B offline run under ``logdir``, sorted by group then name.

    Raises:
        ConfigurationError: ``logdir`` does not exist or holds no run.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ConfigurationError(
            f"Log directory {str(logdir)!r} does not exist; pass the directory given to "
            "`lightning-norm reproduce --logdir` (default runs/s18) or a TensorBoard log dir."
        )
    tb_dirs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    runs = [read_tensorboard_run(d, logdir) for d in tb_dirs]
    seen = {(r.group, r.variant) for r in runs}
    for path in sorted(logdir.rglob("run-*.wandb")):
        run = read_wandb_run(path, logdir)
        if (run.group, run.variant) not in seen:
            runs.append(run)
            seen.add((run.group, run.variant))
    if not runs:
        raise ConfigurationError(
            f"No TensorBoard event files or W&B offline runs under {str(logdir)!r}."
        )
    return sorted(runs, key=lambda r: (r.group, r.name))
