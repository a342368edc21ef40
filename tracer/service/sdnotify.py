"""systemd's readiness protocol (sd_notify(3)): a datagram of KEY=VALUE
lines to the socket in $NOTIFY_SOCKET, so that a ``Type=notify`` unit is
started only once luotrace is really watching.  The protocol is these few
lines; python-systemd would bring libsystemd for them.  Without
$NOTIFY_SOCKET (not under systemd) every call does nothing.

Never blocks: a receiver that is busy or stuck (its queue full) or gone
must not wedge the service in a send; such a notification is dropped,
said once on stderr."""
from __future__ import annotations

import os
import socket
import sys

_said = False


def notify(*lines: str) -> bool:
    """Send LINES (e.g. "READY=1", "STATUS=tracing 30 probes"); True if sent."""
    global _said
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError as e:
        if not _said:
            _said = True
            print(f"luotrace: systemd notification not sent ({e.strerror or e}); later ones are dropped "
                  "silently if they fail too", file=sys.stderr, flush=True)
        return False
