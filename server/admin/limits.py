"""Time limits of admin API calls, enforced by the server whatever deadline a client sets (or none).

Every call is bounded twice: `Limits.idle`, the longest the server waits for the client (its next request message,
or its taking the next response message of a stream), and `Limits.call`, the longest a call may last. A call past
either is ended with DEADLINE_EXCEEDED and a message saying which, so a client that sends a header and stalls (or
stops reading) holds a worker thread for `idle` seconds at most. One `Watchdog` thread ends them.
"""

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

log = logging.getLogger("feddem.admin")


@dataclass(frozen=True)
class Limits:
    idle: float = 60.0  # seconds: the next request message, or the client taking the next response message
    call: float = 6 * 3600.0  # seconds: a whole call (a large upload or export, a long evaluation)


class Watchdog:
    """Runs `end` callbacks at their deadlines (one daemon thread for every call)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count()
        threading.Thread(target=self._loop, name="feddem-admin-watchdog", daemon=True).start()

    def arm(self, seconds: float, end: Callable[[], None]) -> int:
        with self._cond:
            token = next(self._ids)
            self._due[token] = (time.monotonic() + seconds, end)
            self._cond.notify()
            return token

    def disarm(self, token: int | None) -> None:
        if token is not None:
            with self._cond:
                self._due.pop(token, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                fired = [t for t, (at, _) in self._due.items() if at <= now]
                ends = [self._due.pop(t)[1] for t in fired]
                if not ends:
                    wait = min((at for at, _ in self._due.values()), default=now + 60) - now
                    self._cond.wait(timeout=max(wait, 0.01))
                    continue
            for end in ends:
                try:
                    end()
                except Exception:  # one failing end must not stop the others
                    log.exception("admin API: ending a call failed")


def end_call(context: grpc.ServicerContext, message: str) -> None:
    """End the call now with DEADLINE_EXCEEDED and `message` (grpcio's call object takes a status on cancel; a plain
    cancel, the public API, is the fallback and the client then sees CANCELLED)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        from grpc._cython import cygrpc

        call.cancel(cygrpc.StatusCode.deadline_exceeded, message)
    except Exception:
        context.cancel()


class CallGuard:
    """The limits of one call: `call` armed from the start, `idle` while the server waits for the client."""

    def __init__(self, context: grpc.ServicerContext, limits: Limits, watchdog: Watchdog, method: str):
        self.context, self.limits, self.watchdog, self.method = context, limits, watchdog, method
        self.ended = ""  # why the server ended the call, once it has
        self._idle: int | None = None
        self._total = watchdog.arm(limits.call, lambda: self._end(
            f"{method}: the call ran longer than the server allows ({limits.call:g} s)"))

    def _end(self, message: str) -> None:
        self.ended = message
        log.warning("admin API: %s", message)
        end_call(self.context, message)

    def waiting(self) -> None:
        self._idle = self.watchdog.arm(self.limits.idle, lambda: self._end(
            f"{self.method}: no progress from the client for {self.limits.idle:g} s (the server's idle limit)"))

    def done_waiting(self) -> None:
        self.watchdog.disarm(self._idle)
        self._idle = None

    def close(self) -> None:
        self.done_waiting()
        self.watchdog.disarm(self._total)

    def requests(self, iterator: Iterator) -> Iterator:
        """`iterator`'s messages, each awaited under the idle limit."""
        while True:
            self.waiting()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.done_waiting()
            yield item

    def responses(self, iterator: Iterator) -> Iterator:
        """`iterator`'s messages; the client's taking each one is awaited under the idle limit."""
        for item in iterator:
            self.waiting()
            yield item
            self.done_waiting()
