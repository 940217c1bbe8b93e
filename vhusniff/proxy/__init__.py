"""The live proxy: an epoll driver that runs one engine.Session per connection between a real front-end and a
real back-end, forwarding every byte and fd, recording and showing them (driver), and its command line."""

from .driver import Proxy
from .routes import ProxyError, Route

__all__ = ["Proxy", "ProxyError", "Route"]
