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

from sdfleet import broker, keys
from sdfleet.queue import GENERATE_TASK, make_app
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
