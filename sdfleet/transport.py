"""The Redis transport, hardened: an unreadable item on a queue is logged and dropped, not fatal.

kombu's Redis channel decodes each popped item as JSON on the worker's event loop; a non-JSON item
(anything LPUSHed by hand or by a foreign producer) raises there and takes the whole worker down.
The item is already off the list when that happens, so dropping it with a log line loses nothing
that could ever have run.
"""

from __future__ import annotations

import logging

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

logger = logging.getLogger("sdfleet.transport")


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.error("dropped an unreadable item from a queue: %s: %s", type(exc).__name__, exc)
            return True


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make ``redis://`` URLs use this transport in this process."""
    for scheme in ("redis", "rediss"):
        kombu_transport.TRANSPORT_ALIASES[scheme] = "sdfleet.transport:Transport"
