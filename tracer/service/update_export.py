"""The old kernel's final numbers, written when kernel_kexec() is seen (and
at a run's end): a node_exporter textfile, a Pushgateway."""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from exporters.prometheus import push, write_textfile
from tracer.base.errors import LuotraceError
from tracer.live.runner import LiveRun


class UpdateExport:
    """Where the old kernel's final numbers go when kernel_kexec() is seen
    (and at the end of a run): a textfile for node_exporter, a Pushgateway.
    The scrape interval is no longer a race against the kexec."""

    def __init__(self, textfile_dir: Optional[str] = None, pushgateway: Optional[str] = None,
                 per_program: bool = False, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        if textfile_dir is not None and not os.path.isdir(textfile_dir):
            raise LuotraceError(f"--textfile-dir {textfile_dir} is not a directory",
                                "create it, or point it at node_exporter's --collector.textfile.directory")
        if pushgateway is not None and not pushgateway.startswith(("http://", "https://")):
            raise LuotraceError(f"bad --pushgateway '{pushgateway}'", "give its URL, e.g. http://127.0.0.1:9091")
        self.textfile_dir, self.pushgateway, self.per_program = textfile_dir, pushgateway, per_program
        self.progress = progress

    def __bool__(self) -> bool:
        return bool(self.textfile_dir or self.pushgateway)

    def write(self, rep: dict, when: str) -> None:
        """Textfile first (a local fsync), then the network: each failure is one line, never the run's end."""
        if self.textfile_dir:
            try:
                path = write_textfile(self.textfile_dir, rep, self.per_program)
                self.progress(f"luotrace: metrics {when} written to {path}")
            except OSError as e:
                self.progress(f"luotrace: cannot write metrics to {self.textfile_dir}: {e.strerror}")
        if self.pushgateway:
            try:
                push(self.pushgateway, rep, self.per_program)
                self.progress(f"luotrace: metrics {when} pushed to {self.pushgateway}")
            except OSError as e:
                self.progress(f"luotrace: cannot push metrics to {self.pushgateway}: {e}")

    def attach(self, tracing: LiveRun) -> None:
        tracing.on_kexec.append(lambda s: self.write(s.snapshot(), "at the kexec"))
