"""The run's SB3 logger (TensorBoard events and ``progress.csv``), cut back to a checkpoint on
resume, and the logger's pending values saved beside their restore.

On resume TensorBoard's ``purge_step`` drops the events the killed session wrote after the
checkpoint, the old event files are rewritten without them (readers that load one file at a
time, like tbparse, would still see them), and ``progress.csv`` is cut back to the rows written
before the checkpoint.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from stable_baselines3.common.logger import CSVOutputFormat, HumanOutputFormat, Logger, TensorBoardOutputFormat
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter


def make_logger(folder: Path, purge_step: int | None = None, csv_rows: int | None = None,
                stdout: bool = False):
    """SB3 logger writing TensorBoard events and ``progress.csv`` into ``folder``.

    On resume, ``purge_step`` (the checkpoint's step + 1) makes TensorBoard drop the events the
    killed session wrote after the checkpoint, and ``progress.csv`` is cut back to the
    ``csv_rows`` rows written before it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if purge_step is not None:
        truncate_tensorboard(folder, purge_step - 1)
    formats = [ResumableTensorBoard(str(folder), purge_step), ResumableCSV(str(folder / "progress.csv"), csv_rows)]
    if stdout:
        formats.append(HumanOutputFormat(sys.stdout))
    return Logger(folder=str(folder), output_formats=formats)


def truncate_tensorboard(folder: Path, last_step: int) -> None:
    """Rewrite the event files in ``folder`` without the events after ``last_step``.

    ``purge_step`` alone is honoured by TensorBoard (and by an ``EventAccumulator`` over the whole
    folder), but readers that load one file at a time (tbparse) would still see the events the
    killed session wrote after its checkpoint. Each file is replaced atomically; a record torn
    by the kill is dropped.
    """
    for f in sorted(Path(folder).glob("events.out.tfevents.*")):
        tmp = f.with_name(f".{f.name}.tmp")
        with open(tmp, "wb") as out:
            w = RecordWriter(out)
            for raw in RawEventFileLoader(str(f)).Load():
                if event_pb2.Event.FromString(raw).step <= last_step:
                    w.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, f)


class ResumableTensorBoard(TensorBoardOutputFormat):
    """SB3's TensorBoard writer with a ``purge_step``."""

    def __init__(self, folder: str, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        self._is_closed = False


class ResumableCSV(CSVOutputFormat):
    """SB3's CSV writer that counts its rows and can continue a file cut back to ``rows`` rows."""

    def __init__(self, filename: str, rows: int | None = None) -> None:
        self.separator = ","
        self.quotechar = '"'
        self.rows = 0
        self.keys: list[str] = []
        path = Path(filename)
        if rows is None or not path.is_file():
            self.file = open(filename, "w+")
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = lines[: 1 + rows] if lines else []
        with open(filename, "w") as f:
            f.writelines(kept)
        self.file = open(filename, "r+")
        self.file.seek(0, io.SEEK_END)
        if kept:
            self.keys = kept[0].rstrip("\n").split(self.separator)
        self.rows = max(len(kept) - 1, 0)

    def write(self, key_values, key_excluded, step: int = 0) -> None:
        super().write(key_values, key_excluded, step)
        self.rows += 1


def logger_state(logger) -> dict:
    rows = next((f.rows for f in logger.output_formats if isinstance(f, ResumableCSV)), None)
    return {"name_to_value": dict(logger.name_to_value), "name_to_count": dict(logger.name_to_count),
            "name_to_excluded": dict(logger.name_to_excluded), "csv_rows": rows}


def restore_logger(logger, s: dict) -> None:
    logger.name_to_value.update(s["name_to_value"])
    logger.name_to_count.update(s["name_to_count"])
    logger.name_to_excluded.update(s["name_to_excluded"])
