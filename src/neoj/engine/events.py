"""Reading engine events until every sequence has finished, shared by everything that waits on the engine:
Engine.generate and the tasks' EngineRunner block on a queue (drain, below); the server waits in its event
loop (neoj.server.common's Generation). All count sequences down with a Countdown and word a failed
sequence with failure().
"""

from __future__ import annotations

import queue
from typing import Callable, Iterator

from ..errors import GenerationError
from .sequence import Event


class Countdown:
    """The sequences of one or more engine requests still running, counted down as their last events arrive."""

    def __init__(self, sequences: int):
        self.left = sequences

    def see(self, event: Event) -> Event:
        """Returns event, after counting it if it is its sequence's last."""
        if event.finish_reason is not None:
            self.left -= 1
        return event


def failure(event: Event) -> str | None:
    """Returns the message for the last event of a sequence whose generation failed, else None."""
    return f"generation failed: {event.error}" if event.finish_reason == "error" else None


def drain(events: queue.Queue, count: Countdown, idle: Callable[[], None], poll: float) -> Iterator[Event]:
    """Yields the events put on `events` until count has none left; raises GenerationError at a failed sequence.

    idle() runs each time no event came within poll seconds; it may raise to stop waiting (a cancelled task).
    """
    while count.left:
        try:
            event = events.get(timeout=poll)
        except queue.Empty:
            idle()
            continue
        count.see(event)
        message = failure(event)
        if message is not None:
            raise GenerationError(message)
        yield event
