"""Byte links an emulated instrument serves on: a pseudo-terminal or a loopback TCP port.

Both keep one address for the emulator's whole life, so a client reconnects to the same
resource after the emulator dropped the link:

- :class:`PtyLink`: a pty pair in raw mode; the address is a symlink (``.../tty``) to the
  current slave device. Dropping the link makes a new pair, repoints the symlink, then closes
  the old pair (the client's next read or write on the old slave fails with EIO).
- :class:`TcpLink`: a listening socket on 127.0.0.1 (``socket://127.0.0.1:PORT``), one client
  at a time; dropping the link closes that client's connection and the next one is accepted.

``receive`` returns the bytes that came within a timeout (b"" if none), or None when the
client went away or a new one connected (a receiver resets its frame decoder then).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import tempfile
import tty
from pathlib import Path


class PtyLink:
    """A raw pseudo-terminal pair behind a stable symlink."""

    def __init__(self, path: str | None = None) -> None:
        self._dir: str | None = None
        if path is None:
            self._dir = tempfile.mkdtemp(prefix="labep-oim-board-")
            path = str(Path(self._dir) / "tty")
        self.path = path
        self._master = -1
        self._slave = -1
        self._open_pair()

    @property
    def url(self) -> str:
        """What a client opens (``serial.serial_for_url`` takes a device path)."""
        return self.path

    @property
    def device(self) -> str:
        """The current slave device (/dev/pts/N)."""
        return os.ttyname(self._slave)

    def _open_pair(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline: bytes pass untouched
        os.set_blocking(master, False)
        temporary = self.path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        os.symlink(os.ttyname(slave), temporary)
        os.replace(temporary, self.path)
        self._master, self._slave = master, slave

    def receive(self, timeout: float, wake: int) -> bytes | None:
        ready, _, _ = select.select([self._master, wake], [], [], max(timeout, 0.0))
        if self._master not in ready:
            return b""
        try:
            return os.read(self._master, 65536)
        except (BlockingIOError, InterruptedError):
            return b""

    def send(self, data: bytes) -> None:
        """Write to the client; bytes the client does not take within 1 s are lost (as on a
        serial line nobody reads)."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._master, view):]
            except BlockingIOError:
                _, ready, _ = select.select([], [self._master], [], 1.0)
                if not ready:
                    return
            except OSError:
                return

    def drop(self) -> None:
        """Close the link under the client; the symlink already points to a fresh pair."""
        old = (self._master, self._slave)
        self._open_pair()
        for fd in old:
            os.close(fd)

    def close(self) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class TcpLink:
    """A loopback TCP server for one client at a time."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(4)
        self.host, self.port = self._listener.getsockname()[:2]
        self._conn: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"socket://{self.host}:{self.port}"

    def receive(self, timeout: float, wake: int) -> bytes | None:
        watched = self._conn if self._conn is not None else self._listener
        ready, _, _ = select.select([watched, wake], [], [], max(timeout, 0.0))
        if watched not in ready:
            return b""
        if self._conn is None:
            self._conn, _ = self._listener.accept()
            self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return None
        try:
            data = self._conn.recv(65536)
        except OSError:
            data = b""
        if not data:  # the client closed its end
            self.drop()
            return None
        return data

    def send(self, data: bytes) -> None:
        if self._conn is None:
            return
        try:
            self._conn.sendall(data)
        except OSError:
            self.drop()

    def drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.drop()
        with contextlib.suppress(OSError):
            self._listener.close()
