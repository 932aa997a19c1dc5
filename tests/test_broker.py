"""The kombu layout that sdfleet/broker.py reads, checked against kombu itself with a real Redis.

These fail the day kombu changes how its Redis transport keeps unacknowledged messages or priority lists;
nothing else in sdfleet knows that layout. A last test checks that no private name the old consumer relied on
is back anywhere in the code.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import kombu
import redis
from kombu.common import ignore_errors
from kombu.transport import redis as kombu_redis

from sdfleet import broker, keys
from sdfleet.queue import GENERATE_TASK, make_app
from sdfleet.redisconn import PrivateRedis
from sdfleet.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _publish(app, queue: str, job_id: str, priority: int | None = None) -> None:
    app.send_task(GENERATE_TASK, kwargs={"job_id": job_id}, queue=queue, task_id=job_id,
                  **({"priority": priority} if priority is not None else {}))


def test_queue_lists_and_depth_follow_kombus_priorities(redis_url):
    app = make_app(Settings(redis_url=redis_url))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    q = keys.queue_for_model("layout")
    for i, pri in enumerate([None, 0, 3, 5, 9]):
        _publish(app, q, f"j{i}", pri)
    assert broker.queue_depth(r, q) == 5
    assert sorted(broker.queued_job_ids(r, q)) == [f"j{i}" for i in range(5)]
    present = [name for name in broker.queue_lists(q) if r.llen(name)]
    assert q in present and len(present) >= 3  # priorities 3..9 live in lists of their own
    assert set(r.keys(f"{q}*")) <= set(broker.queue_lists(q))


def test_unacked_entries_as_kombu_keeps_them(redis_url):
    app = make_app(Settings(redis_url=redis_url))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    q = keys.queue_for_model("layout2")
    _publish(app, q, "held-1")
    t0 = time.time()
    with app.connection_for_write() as conn:
        got = []
        consumer = kombu.Consumer(conn.default_channel, queues=[kombu.Queue(q)], callbacks=[lambda b, m: got.append(m)],
                                  accept=["json"])
        consumer.qos(prefetch_count=10)
        with consumer:
            conn.drain_events(timeout=5)
        (message,) = got
        tag = message.delivery_tag
        # Delivered, not acknowledged: kombu's bookkeeping holds it; sdfleet.broker reads it.
        assert broker.unacked_count(r) == 1
        assert broker.unacked_entry(r, tag) == ("held-1", q)
        assert [(t, j, rk) for t, j, rk in broker.unacked_job_ids(r)] == [(tag, "held-1", q)]
        assert broker.unacked_older_than(r, t0 - 60) == [] and broker.unacked_older_than(r, time.time() + 1) == [tag]
        # kombu's public restore puts it back on the queue, which sdfleet's reclaim sweep relies on.
        conn.default_channel.qos.restore_by_tag(tag)
        assert broker.unacked_entry(r, tag) == (None, None) and broker.queued_job_ids(r, q) == ["held-1"]


def test_a_purge_through_the_transport_notes_the_purged_jobs(redis_url):
    app = make_app(Settings(redis_url=redis_url))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    q = keys.queue_for_model("layout3")
    for i, pri in enumerate([None, 6]):
        _publish(app, q, f"p{i}", pri)
    seen = []
    broker.on_purge(lambda client, queue, ids: seen.append((queue, sorted(ids))))
    with app.connection_for_write() as conn:
        assert conn.default_channel.queue_purge(q) == 2
    assert seen[-1] == (q, ["p0", "p1"])
    assert r.smembers(keys.PURGED) >= {"p0", "p1"} and broker.queue_depth(r, q) == 0


def test_no_private_names_of_kombu_or_redis_py_remain():
    """The old consumer overrode kombu's _brpop_read, wrote kombu's `unacked` bookkeeping itself and read
    redis-py's connection sockets. None of that may come back; reads of kombu's layout stay in broker.py."""
    banned = re.compile(r"_brpop_read|_flush_brpop_reauth|_do_restore_message|\._sock\b|_deliver\(|"
                        r"_transport_cache|\bhset\(\s*['\"]unacked|_append_pipe")
    layout = re.compile(r"['\"]unacked(_index)?['\"]|\\x06\\x16")
    for path in [*ROOT.glob("sdfleet/**/*.py"), *ROOT.glob("worker/**/*.py"), *ROOT.glob("scheduler/**/*.py"),
                 *ROOT.glob("producer/**/*.py"), *ROOT.glob("bench/*.py")]:
        text = path.read_text()
        assert not banned.search(text), f"{path.relative_to(ROOT)} uses a private name: {banned.search(text)[0]}"
        if path.name != "broker.py":
            assert not layout.search(text), f"{path.relative_to(ROOT)} knows kombu's layout: {layout.search(text)[0]}"


def test_short_commands_share_one_client_and_the_brpop_client_stays_apart(redis_url):
    """kombu asks the channel's public ``Client`` factory for a new redis client on every short command
    (``conn_or_acquire``); sdfleet's channel answers with one client per synchronous pool. This fails the day
    kombu stops building those clients through ``Channel.Client`` (the saving is then gone, not the function),
    and if the shared client were ever the one kombu pins its BRPOP connection to."""
    app = make_app(Settings(redis_url=redis_url))
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        assert isinstance(ch, broker.Channel) and isinstance(ch.Client, broker._SharedSyncClient)
        with ch.conn_or_acquire() as a, ch.conn_or_acquire() as b:
            assert a is b and a.connection_pool is ch.pool
            assert a.ping()
        # The asynchronous client (BRPOP, with a connection of its own) is kombu's own, built apart.
        assert ch.client is not a and ch.client.connection_pool is not ch.pool
        # A message through publish, delivery, unacked record and ack still works with the shared client.
        q = keys.queue_for_model("layout4")
        _publish(app, q, "shared-1")
        queue = kombu.Queue(q, kombu.Exchange(q), routing_key=q)
        got = []
        with conn.Consumer(queue, callbacks=[lambda body, m: got.append(m)], accept=["json"]):
            _drain_until(conn, got)
            assert got and got[0].headers["id"] == "shared-1"
            got[0].ack()
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert broker.unacked_count(r) == 0 and broker.queue_depth(r, q) == 0


def _drain_until(conn, got: list, timeout: float = 10) -> None:
    """Drain the connection's events until a consumer callback has filled ``got`` (or ``timeout`` passed)."""
    deadline = time.time() + timeout
    while not got and time.time() < deadline:
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass


def test_a_channel_closed_after_its_connection_was_collected_fails_as_a_lost_connection():
    """Redis killed while a worker consumes: Celery's consumer collects the connection, then closes it
    (celery 5.7, ``Consumer.on_connection_error_after_connected``). With a BRPOP in flight the consuming
    channel's first close fails on the dead socket, the remote-control channel's close fails too and kombu
    closes no further channel; collecting then detaches the transport, and the last close restored the
    unacknowledged messages through a pool built from no connection: ``AttributeError: 'NoneType' object has
    no attribute 'hostname'``, an unrecoverable error for Celery (the worker exited instead of reconnecting).
    It must fail as a lost connection does. Also fails the day kombu stops building pools through the
    ``pool`` / ``async_pool`` properties that sdfleet's channel guards."""
    assert isinstance(kombu_redis.Channel.__dict__["pool"], property)
    assert isinstance(kombu_redis.Channel.__dict__["async_pool"], property)
    server = PrivateRedis()
    try:
        app = make_app(Settings(redis_url=server.url))
        q = keys.queue_for_model("collect")
        _publish(app, q, "held-1")
        conn = app.connection_for_read()
        conn.connect()
        channel = conn.default_channel
        assert isinstance(channel, broker.Channel)
        got = []
        kombu.Consumer(channel, queues=[kombu.Queue(q, kombu.Exchange(q), routing_key=q)],
                       callbacks=[lambda body, m: got.append(m)], accept=["json"]).consume()
        # Beside it, a channel like Celery's remote control: a fanout queue deleted when its channel closes.
        pidbox = kombu.Queue("collect.pidbox", kombu.Exchange("collect.pidbox", "fanout"), auto_delete=True)
        kombu.Consumer(conn.channel(), queues=[pidbox], no_ack=True).consume()
        _drain_until(conn, got)
        assert got, "a message delivered and not acknowledged"
        try:
            conn.drain_events(timeout=0.2)  # leaves the next BRPOP in flight
        except TimeoutError:
            pass
        server.proc.kill()
        server.proc.wait(10)
        try:  # as Celery does: collect, errors ignored, then close, connection errors ignored
            conn.collect(socket_timeout=1)
        except Exception:
            pass
        ignore_errors(conn, conn.close)
        assert channel.closed
    finally:
        server.stop()
