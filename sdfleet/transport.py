"""The Redis transport, hardened and made cheaper per message.

- An unreadable item on a queue is logged and dropped, not fatal: kombu decodes each popped item as
  JSON on the worker's event loop, and a non-JSON item (anything LPUSHed by hand or by a foreign
  producer) would raise there and take the whole worker down. The item is already off the list by then,
  so dropping it loses nothing that could ever have run.
- One Redis client per channel for bookkeeping: kombu builds a new client object for every ack and
  every delivery (about 0.4 ms each, most of a message's cost at a thousand messages a second).
- Deliveries come in bursts: after the blocking pop returns one message, up to ``burst`` more are
  taken from the same queue with one non-blocking RPOP and recorded as unacknowledged in one pipeline
  (kombu pops and records one message per round trip).

The GPU worker does not consume through kombu at all: it claims the generation queue in bulk
(:mod:`sdfleet.unacked`, :mod:`worker.consumer`). Producers and the webhook worker use this transport.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from queue import Empty

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

logger = logging.getLogger("sdfleet.transport")


class QoS(kombu_redis.QoS):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._append_pipe = None  # set while a burst of deliveries records itself in one round trip

    def append(self, message, delivery_tag):
        if self._append_pipe is None:
            return super().append(message, delivery_tag)
        delivery = message.delivery_info
        self._append_pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
            self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
        virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
        else:
            shared = self.__dict__.get("_sdfleet_client")
            if shared is None:
                shared = self.__dict__["_sdfleet_client"] = self._create_client()
            yield shared

    #: after a blocking pop returns one message, take up to this many more from the same queue at once
    burst = 16

    def _brpop_read(self, **options):
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest_item:
                raise Empty()
            key, item = dest_item
            key = bytes_to_str(key)
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            items = [item]
            room = self.qos.prefetch_count - len(self.qos._delivered) - 1 if self.qos.prefetch_count else self.burst
            if room > 0:
                # A non-blocking RPOP with a count on the connection the BRPOP just freed.
                self.client.connection.send_command("RPOP", key, min(room, self.burst))
                more = self.client.parse_response(self.client.connection, "RPOP")
                items += more or []
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            self.qos._append_pipe = pipe
            try:
                for raw in items:
                    try:
                        self.connection._deliver(loads(bytes_to_str(raw)), dest)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        logger.error("dropped an unreadable item from a queue: %s: %s", type(exc).__name__, exc)
            finally:
                self.qos._append_pipe = None
                pipe.execute()
        return True


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make ``redis://`` URLs use this transport in this process."""
    for scheme in ("redis", "rediss"):
        kombu_transport.TRANSPORT_ALIASES[scheme] = "sdfleet.transport:Transport"
        # kombu caches resolved names; drop a stale entry from a connection made before this call.
        getattr(kombu_transport, "_transport_cache", {}).pop(scheme, None)
