"""The engine: one sans-io session core (core.Session) that every driver runs on -- the proxy, replay's
scripted peers, a fuzzer -- with the hook API it interprets (hooks), and the fd and socket primitives the
drivers share (fds, sockio)."""
from .core import (
                   HALF_CLOSE_GRACE_SECONDS,
                   Capture,
                   CloseChannel,
                   CloseConnection,
                   CloseFds,
                   Command,
                   Fate,
                   Inject,
                   Note,
                   Send,
                   Session,
                   ShutWrite,
                   Side,
                   StopReading,
                   Wake,
)

__all__ = ["HALF_CLOSE_GRACE_SECONDS", "Capture", "CloseChannel", "CloseConnection", "CloseFds", "Command", "Fate",
           "Inject", "Note", "Send", "Session", "ShutWrite", "Side", "StopReading", "Wake"]
