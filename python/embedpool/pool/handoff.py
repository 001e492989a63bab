"""The batch channel's far end, for the feeder threads: batches cross to a thread in one step of the event loop.

The batch channel stays a bounded anyio stream, read only on the event loop. A feeder thread hands back its last
batch's outcome and asks for the next in one callback posted onto the loop, then waits on its own one-slot mailbox
(a thread-safe queue that never holds more than one item). When a batch is waiting, that callback puts it there.
When none is, the feeder is parked: the scheduler calls `sent()` after each batch it sends, which passes the batch
to the feeder parked longest.

Waiting on the channel with a task per feeder (anyio's `from_thread.run` of an awaiting receive) costs a task,
its cancel scope and a cross-thread future each batch: six turns of the event loop for a one-document call on an
idle server, against three here, and on a loaded one a single callback per batch. Only idle feeders are parked,
so a batch still goes to whichever feeder is free first.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable
from typing import Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from embedpool.pool.scheduler import Batch


class _End:
    """The channel is closed and drained: the feeder ends."""


END: Final = _End()
Mail = Batch | _End
Take = Callable[[Batch], Batch]
"""On the event loop, as a batch is handed to a feeder: what the feeder will run (see Feeder._take)."""


class Mailbox:
    """One feeder's slot. `put` on the event loop, `get` on the feeder thread; at most one item is ever in it."""

    def __init__(self, take: Take) -> None:
        self.take = take
        self._slot: queue.SimpleQueue[Mail] = queue.SimpleQueue()

    def put(self, item: Mail) -> None:
        self._slot.put(item)

    def get(self, timeout: float | None = None) -> Mail | None:
        """The item, or None once `timeout` passed without one."""
        try:
            return self._slot.get(timeout=timeout)
        except queue.Empty:
            return None


class Handoff:
    """Every method runs on the event loop."""

    def __init__(self, batches: MemoryObjectReceiveStream[Batch]) -> None:
        self._batches = batches
        self._parked: deque[Mailbox] = deque()

    def take_or_park(self, mailbox: Mailbox) -> Mail | None:
        """The next batch (or END) now; None when there is none yet, the mailbox then parked until there is."""
        item = self._receive()
        if item is None:
            self._parked.append(mailbox)
            return None
        return item if isinstance(item, _End) else mailbox.take(item)

    def unpark(self, mailbox: Mailbox) -> bool:
        """Takes a parked mailbox back (a feeder that stops waiting); False if a batch or END was put in it."""
        try:
            self._parked.remove(mailbox)
        except ValueError:
            return False
        return True

    def sent(self) -> None:
        """A batch was sent, or the channel closed: parked feeders get what is there (END once it is drained)."""
        while self._parked:
            item = self._receive()
            if item is None:
                return
            mailbox = self._parked.popleft()
            mailbox.put(item if isinstance(item, _End) else mailbox.take(item))

    def _receive(self) -> Mail | None:
        try:
            return self._batches.receive_nowait()
        except anyio.WouldBlock:
            return None
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return END

    def close(self) -> None:
        """Once the feeders ended: closes this end of the channel (anything still parked is told to end)."""
        while self._parked:
            self._parked.popleft().put(END)
        self._batches.close()
