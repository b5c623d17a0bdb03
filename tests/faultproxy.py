"""A TCP proxy that injects network faults, for the resilience tests.

It listens on 127.0.0.1 (a free port) and forwards every connection to a target host:port.
It runs its own event loop in a thread, so sync and async tests drive it alike:

    with FaultProxy("127.0.0.1", redis_port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        proxy.set_fault(Fault.BLACKHOLE)      # reads hang, nothing is closed
        proxy.set_fault(Fault.LATENCY, latency_s=0.05)
        proxy.set_fault(Fault.SLICE, slice_bytes=1, slice_delay_s=0.001)
        proxy.set_fault(Fault.RESET)          # RST every connection, and each new one
        proxy.clear()                         # pass-through again

Faults, switchable at run time (each applies to open and new connections):

- PASS: bytes forwarded as they come.
- LATENCY: each chunk waits `latency_s` before it is forwarded (both directions).
- SLICE: chunks forwarded in `slice_bytes` pieces, `slice_delay_s` apart.
- BLACKHOLE (half-open): connections are accepted but nothing is forwarded and nothing is
  closed; a new connection is not even opened upstream. Like a paused peer or a silent
  network: the other side only learns of it through its own timeouts. `clear()` lets the
  held bytes through, in order (as TCP would once the path comes back).
- RESET: every open connection is closed with an RST on both sides (SO_LINGER 0), and each
  new one is accepted and reset at once.

A connection whose upstream refuses (the target is down) is reset too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any


class Fault(enum.Enum):
    """What the proxy does to the bytes it forwards."""

    PASS = "pass"
    LATENCY = "latency"
    SLICE = "slice"
    BLACKHOLE = "blackhole"
    RESET = "reset"


HALF_OPEN = Fault.BLACKHOLE
"""Another name for BLACKHOLE."""


@dataclass
class _Settings:
    fault: Fault = Fault.PASS
    latency_s: float = 0.0
    slice_bytes: int = 1
    slice_delay_s: float = 0.0


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with an RST: SO_LINGER on with a zero timeout, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A fault-injecting TCP proxy in front of `target_host:target_port`."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.accepted = 0
        """Connections accepted so far."""
        self._settings = _Settings()
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None

    # --- control, from any thread --------------------------------------------------------

    def start(self) -> FaultProxy:
        """Starts listening (returns once the port is bound)."""
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._listen())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        """Closes every connection and stops listening."""
        if self._loop is None or self._thread is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def set_fault(
        self,
        fault: Fault,
        *,
        latency_s: float = 0.05,
        slice_bytes: int = 1,
        slice_delay_s: float = 0.0,
    ) -> None:
        """Switches the fault (returns once it applies to every connection)."""
        if slice_bytes < 1:
            raise ValueError("slice_bytes must be at least 1")
        settings = _Settings(fault, latency_s, slice_bytes, slice_delay_s)
        self._call(self._apply(settings))

    def clear(self) -> None:
        """Back to pass-through; held (blackholed) bytes go on."""
        self.set_fault(Fault.PASS)

    @property
    def fault(self) -> Fault:
        return self._settings.fault

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the fault proxy is not running")
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    # --- the proxy's loop -------------------------------------------------------------------

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            await self._cut(link)
        await self._server.wait_closed()

    async def _apply(self, settings: _Settings) -> None:
        assert self._flowing is not None
        self._settings = settings
        if settings.fault == Fault.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()
        if settings.fault == Fault.RESET:
            for link in list(self._links):
                await self._cut(link)

    async def _cut(self, link: _Link) -> None:
        self._links.discard(link)
        _reset(link.client)
        if link.upstream is not None:
            _reset(link.upstream)
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        for task in link.tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        if self._settings.fault == Fault.RESET:
            _reset(writer)
            return
        link = _Link(client=writer)
        self._links.add(link)
        starter = asyncio.current_task()
        assert starter is not None
        link.tasks.append(starter)
        try:
            # Blackholed: hold the connection without opening the upstream one.
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self._links.discard(link)
                _reset(writer)
                return
            link.upstream = up_writer
            if link not in self._links:  # reset while connecting
                _reset(up_writer)
                return
            link.tasks.remove(starter)
            link.tasks += [
                asyncio.create_task(self._pump(reader, up_writer, link)),
                asyncio.create_task(self._pump(up_reader, writer, link)),
            ]
        except asyncio.CancelledError:
            return

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(65536)
                if not data:
                    break
                # A fault switched on while the read waited applies to these bytes too.
                await self._flowing.wait()
                settings = self._settings
                if settings.fault == Fault.LATENCY:
                    await asyncio.sleep(settings.latency_s)
                if settings.fault == Fault.SLICE:
                    for start in range(0, len(data), settings.slice_bytes):
                        sink.write(data[start : start + settings.slice_bytes])
                        await sink.drain()
                        await asyncio.sleep(settings.slice_delay_s)
                else:
                    sink.write(data)
                    await sink.drain()
        except (ConnectionError, OSError):
            pass
        # One side ended: end the other (a proxy that half-closed would hide resets).
        if link in self._links:
            self._links.discard(link)
            for writer in (link.client, link.upstream):
                if writer is not None:
                    writer.close()
            for task in link.tasks:
                if task is not asyncio.current_task():
                    task.cancel()
