"""Everything sdfleet knows about how kombu's Redis transport lays out its keys, in one module.

Consumption, acknowledgement and redelivery all go through kombu and Celery's public API: the GPU worker is
a normal Celery consumer and hands messages back with ``message.reject`` / ``QoS.restore_by_tag``. What kombu
does not offer publicly is a way to *look*: to tell which unacknowledged messages belong to a worker that
died, whether a queue (with its priority lists) is empty, and which jobs a purge removed. Those reads rely on
kombu 5.7's layout, which is not a public contract, so they live here alone, and ``tests/test_broker.py``
fails the day it changes:

- unacknowledged messages: hash ``unacked`` (delivery tag -> JSON ``[message, exchange, routing_key]``) and
  sorted set ``unacked_index`` (delivery tag scored by delivery time);
- a queue with priorities: the list named after the queue (priority 0) plus ``<queue>\\x06\\x16<p>`` for the
  other priority steps.

Nothing here writes a kombu key. The one write-side extension, :class:`Channel.queue_purge`, overrides a
public method and calls kombu's own purge after noting which jobs it removes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from sdfleet import keys

UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, highest priority first."""
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def queue_depth(r: redis.Redis, queue: str) -> int:
    pipe = r.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.llen(name)
    return sum(int(n) for n in pipe.execute())


def queued_job_ids(r: redis.Redis, queue: str) -> list[str]:
    """The task (job) ids of every message waiting in ``queue``, all priorities."""
    out: list[str] = []
    for name in queue_lists(queue):
        for raw in r.lrange(name, 0, -1):
            job_id = _message_id(raw)
            if job_id:
                out.append(job_id)
    return out


def _message_id(raw: str | bytes) -> str | None:
    try:
        payload = json.loads(raw)
        job_id = payload["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return job_id if isinstance(job_id, str) else None


def unacked_older_than(r: redis.Redis, epoch: float) -> list[str]:
    """Delivery tags of unacknowledged messages delivered before ``epoch``."""
    return list(r.zrangebyscore(UNACKED_INDEX, 0, epoch))


def unacked_count(r: redis.Redis) -> int:
    return int(r.zcard(UNACKED_INDEX))


def unacked_entry(r: redis.Redis, tag: str) -> tuple[str | None, str | None]:
    """(job id, routing key) of one unacknowledged message; (None, None) when it is gone or unreadable."""
    raw = r.hget(UNACKED, tag)
    if raw is None:
        return None, None
    try:
        message, _exchange, routing_key = json.loads(raw)
        return message["headers"]["id"], routing_key
    except (ValueError, KeyError, TypeError):
        return None, None


def unacked_job_ids(r: redis.Redis) -> Iterator[tuple[str, str, str]]:
    """(delivery tag, job id, routing key) of every unacknowledged message."""
    for tag, raw in r.hscan_iter(UNACKED, count=500):
        try:
            message, _exchange, routing_key = json.loads(raw)
            yield tag, message["headers"]["id"], routing_key
        except (ValueError, KeyError, TypeError):
            continue


# --- purge ----------------------------------------------------------------------------------------------

#: called with (redis client, queue, job ids) after a purge removed those jobs' messages
PurgeHook = Callable[[redis.Redis, str, list[str]], Any]
_purge_hooks: list[PurgeHook] = []


def on_purge(hook: PurgeHook) -> None:
    """Register what runs after ``celery purge`` (or any kombu queue_purge through this transport)."""
    if hook not in _purge_hooks:
        _purge_hooks.append(hook)


class _SharedSyncClient:
    """Stands in for the channel's public ``Client`` factory: one client for the channel's synchronous pool.

    kombu builds a new ``redis.Redis`` for every short command it sends (``Channel.conn_or_acquire``: each
    unacknowledged-message record, each acknowledgement, each event published), and a ``redis.Redis`` fills
    its table of some 200 response callbacks as it is built: measured at about a sixth of a worker's CPU at
    batch 8. Those clients hold nothing but their pool (each command or pipeline takes a connection from it),
    so the synchronous pool's can be one. Clients of any other pool (the asynchronous one, whose client kombu
    pins a BRPOP connection to) are built fresh, as kombu would.
    """

    def __init__(self, channel: kombu_redis.Channel, make: Callable[..., Any]):
        self.channel = channel
        self.make = make
        self._cache: tuple[Any, tuple, Any] | None = None  # (pool, other kwargs, client)

    def __call__(self, **kwargs: Any) -> Any:
        pool = kwargs.get("connection_pool")
        # ``Channel.pool`` is public: the synchronous pool (made on first use; asking never connects).
        if pool is None or pool is not self.channel.pool:
            return self.make(**kwargs)
        rest = tuple(sorted((k, id(v)) for k, v in kwargs.items() if k != "connection_pool"))
        cached = self._cache
        if cached is not None and cached[0] is pool and cached[1] == rest:
            return cached[2]
        client = self.make(**kwargs)
        self._cache = (pool, rest, client)
        return client


class Channel(kombu_redis.Channel):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.Client = _SharedSyncClient(self, self.Client)

    # A channel builds its connection pools on first use, from its transport's ``client`` (the
    # ``kombu.Connection``), and drops them when it closes. After a lost connection Celery's consumer collects
    # and then closes the connection (``Consumer.on_connection_error_after_connected``); collecting detaches the
    # transport (``transport.client = None``). A channel whose first close was cut short by the dead socket (a
    # BRPOP still in flight when another socket, the remote-control channel's, reported the loss; that
    # channel's close fails too and kombu closes no further channel) is closed again after that, restores its
    # unacknowledged messages through a new pool and fails with ``AttributeError: 'NoneType' object has no
    # attribute 'hostname'``, which Celery takes for an unrecoverable error: the worker exits instead of
    # reconnecting. A pool asked of a detached channel raises a connection error instead: the restore fails as
    # it does whenever Redis is away at close (the messages stay unacknowledged: the reclaim sweep restores a
    # generation queue's, the visibility timeout the webhook queue's), and Celery reconnects.
    @property
    def pool(self) -> Any:
        self._check_attached()
        return super().pool

    @property
    def async_pool(self) -> Any:
        self._check_attached()
        return super().async_pool

    def _check_attached(self) -> None:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.ConnectionError("the broker connection of this channel is closed")

    def queue_purge(self, queue: str, **kwargs: Any) -> int:
        """Purge as kombu does, but first note the purged jobs, so they end ``cancelled`` instead of being
        taken for lost messages and enqueued again."""
        if not queue.startswith(keys.GEN_QUEUE_PREFIX):
            return super().queue_purge(queue, **kwargs)
        with self.conn_or_acquire() as client:
            r = redis.Redis(connection_pool=client.connection_pool)
            ids = []
            for name in queue_lists(queue):
                ids += [i for i in map(_message_id, r.lrange(name, 0, -1)) if i]
            if ids:
                # Noted before the purge: a purger that dies in between leaves marked jobs, which the sweep
                # cancels, never jobs that vanished without a trace.
                pipe = r.pipeline(transaction=False)
                pipe.sadd(keys.PURGED, *ids)
                pipe.expire(keys.PURGED, keys.RECORD_TTL_S)
                pipe.execute()
            n = super().queue_purge(queue, **kwargs)
            for hook in list(_purge_hooks):
                hook(r, queue, ids)
        return n


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Serve ``redis://`` and ``rediss://`` URLs in this process with :class:`Transport`.

    Through kombu's public alias table rather than Celery's ``broker_transport`` setting, so a connection's URL
    stays ``redis://...``: Flower reads queue lengths only from a URL with that scheme. Called when the app
    is made, before any connection resolves the alias (kombu caches what it resolved).
    """
    from kombu import transport

    for scheme in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
