"""Progress of a batch run on a terminal (bars rewritten in place) or in a log (lines).

`Display.on_event` is the `on_event` callback of `dpjax.runner.run`.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
from typing import Any

from absl import logging as absl_logging

_LOG = absl_logging.get_absl_logger()  # a stdlib Logger: levels are logging.INFO etc.


class Display:
    """Progress bars on stderr (rewritten in place on a terminal, else logged lines)."""

    def __init__(self, quiet: bool, stream=None):
        from dpjax import batch

        self._batch = batch
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.eta = batch.BatchEta(total=0, workers=1)
        self.active: dict[str, str] = {}
        self.lock = threading.RLock()
        self._drawn = False

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def _draw(self) -> None:
        if self.quiet or not self.tty:
            return
        cols = shutil.get_terminal_size((160, 24)).columns - 1
        line = " | ".join(list(self.active.values())
                          + [self._batch.format_batch_progress(self.eta)])
        self.stream.write("\r\033[K" + line[-cols:])  # the overall bar (last) stays visible
        self.stream.flush()
        self._drawn = True

    def log(self, level: int, msg: str) -> None:
        with self.lock:
            self._clear()
            _LOG.log(level, "%s", msg)
            self._draw()

    def on_event(self, event) -> None:
        kind = event.kind
        if kind == "log":
            level, msg = event.data
            self.log(level, msg)
        elif kind == "start":
            d = event.data
            self.eta = self._batch.BatchEta(total=d["share"], workers=len(d["devices"]))
            self.log(logging.INFO if not self.quiet else logging.DEBUG,
                     f"process {d['process_index'] + 1}/{d['process_count']}: {d['share']} of "
                     f"{d['scenes']} scenes on {len(d['devices'])} device(s): "
                     f"{', '.join(d['devices'])}")
        elif kind == "progress":
            self._progress(event.scene, event.data)
        elif kind == "scene":
            self._finished(event.data)

    def _progress(self, name: str, eta: Any) -> None:
        if self.quiet:
            return
        with self.lock:
            self.active[name] = self._batch.format_scene_progress(name, eta)
            if self.tty:
                self._draw()
            else:
                _LOG.info("%s  %s", self.active[name],
                             self._batch.format_batch_progress(self.eta))

    def _finished(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.active.pop(rec["scene"], None)
            self.eta.record(rec["status"], (rec.get("timings") or {}).get("total_s"))
            status = rec["status"]
            if status == "failed":
                self.log(logging.ERROR, f"{rec['scene']}: FAILED {rec['reason']}")
            elif status == "skipped":
                self.log(logging.INFO, f"{rec['scene']}: skipped, {rec['reason']}")
            else:
                loss = rec.get("final_loss")
                self.log(logging.INFO, f"{rec['scene']}: done in "
                         f"{self._batch.format_duration(rec['timings']['total_s'])} (loss "
                         f"{float('nan') if loss is None else loss:.5g})  "
                         f"{self._batch.format_batch_progress(self.eta)}")

    def close(self) -> None:
        with self.lock:
            self._clear()
