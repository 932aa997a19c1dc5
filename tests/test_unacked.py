"""Bulk claims against a real Redis: kombu's own bookkeeping, exactly, so kombu and the janitor can restore
what a worker claimed; acknowledgements and hand-backs; unreadable items."""

from __future__ import annotations

import json
import time

import pytest
from kombu import Connection
from kombu.utils.json import loads as kombu_loads

from producer.submit import submit
from scheduler.janitor import restore_by_tag, unacked_tags_by_job
from sdfleet import keys
from sdfleet.jobs import parse_job
from sdfleet.queue import make_app
from sdfleet.settings import Settings
from sdfleet.state import JobStore
from sdfleet.storage import StorageFactory
from sdfleet.unacked import UNACKED, UNACKED_INDEX, BulkQueue

QUEUE = keys.queue_for_model("null")
HELD = keys.worker_held("w1")


@pytest.fixture
def queued(r, redis_url, tmp_path):
    """Five real job messages on the null model's queue; returns their job ids in submission order."""
    specs = [parse_job({"prompt": f"p{i}", "model": "null", "width": 256, "height": 256, "custom_id": f"c{i}"})
             for i in range(5)]
    submit(specs, store=JobStore(r), app=make_app(Settings(redis_url=redis_url)), storage=StorageFactory(),
           default_out=f"file://{tmp_path}", batch_name="bq")
    return r.lrange(keys.batch_jobs("bq"), 0, -1)


def test_claim_records_messages_as_kombu_does(r, queued):
    q = BulkQueue(r, QUEUE, HELD)
    before = time.time()
    claimed = q.claim(3)
    assert [json.loads(raw)["headers"]["id"] for _, raw in claimed] == queued[:3], "oldest first"
    assert r.llen(QUEUE) == 2
    for tag, raw in claimed:
        payload = json.loads(raw)
        assert tag == payload["properties"]["delivery_tag"]
        # kombu's value: [message, exchange, routing_key], readable by kombu's own decoder.
        message, exchange, routing_key = kombu_loads(r.hget(UNACKED, tag))
        assert message == payload and exchange == "" and routing_key == QUEUE
        assert before - 1 <= r.zscore(UNACKED_INDEX, tag) <= time.time() + 1
    assert r.smembers(HELD) == set(queued[:3])
    assert unacked_tags_by_job(r) == {json.loads(raw)["headers"]["id"]: tag for tag, raw in claimed}


def test_acknowledgements_settle_with_the_next_claim(r, queued):
    q = BulkQueue(r, QUEUE, HELD)
    first = q.claim(2)
    acks = [(tag, json.loads(raw)["headers"]["id"]) for tag, raw in first]
    second = q.claim(3, acks)
    assert len(second) == 3 and r.llen(QUEUE) == 0
    assert r.hlen(UNACKED) == 3 and r.zcard(UNACKED_INDEX) == 3
    assert r.smembers(HELD) == set(queued[2:])
    assert q.claim(0, [(tag, json.loads(raw)["headers"]["id"]) for tag, raw in second]) == []
    assert r.hlen(UNACKED) == 0 and r.zcard(UNACKED_INDEX) == 0 and r.scard(HELD) == 0


def test_requeue_puts_messages_back_at_the_head_in_order_once(r, queued):
    q = BulkQueue(r, QUEUE, HELD)
    claimed = q.claim(3)
    items = [(tag, json.loads(raw)["headers"]["id"], raw) for tag, raw in claimed]
    assert q.requeue(items) == 3
    assert q.requeue(items) == 0, "a message handed back already is not pushed twice"
    assert r.hlen(UNACKED) == 0 and r.scard(HELD) == 0 and r.llen(QUEUE) == 5
    again = q.claim(5)
    assert [json.loads(raw)["headers"]["id"] for _, raw in again] == queued, "the queue's order is kept"
    assert [raw for _, raw in again[:3]] == [raw for _, raw in claimed], "byte for byte"


def test_unreadable_items_are_returned_unrecorded(r):
    r.lpush(QUEUE, "not json", json.dumps({"body": "x"}), json.dumps({"properties": {"delivery_tag": "t"}}))
    claimed = BulkQueue(r, QUEUE, HELD).claim(10)
    assert [tag for tag, _ in claimed] == ["", "", ""]
    assert claimed[0][1] == "not json"
    assert r.llen(QUEUE) == 0 and r.hlen(UNACKED) == 0 and r.zcard(UNACKED_INDEX) == 0 and r.scard(HELD) == 0


def test_kombus_visibility_timeout_and_the_janitor_restore_claimed_messages(r, redis_url, queued):
    q = BulkQueue(r, QUEUE, HELD)
    claimed = q.claim(4)
    # The janitor hands one back at once (a dead worker's message) ...
    assert restore_by_tag(r, claimed[0][0])
    assert r.llen(QUEUE) == 2 and r.hlen(UNACKED) == 3
    # ... kombu's own visibility-timeout restore hands back the rest once they are older than the timeout.
    time.sleep(1.1)
    with Connection(redis_url, transport_options={"visibility_timeout": 1}) as conn:
        conn.default_channel.qos.restore_visible(num=100, interval=1)
    assert r.hlen(UNACKED) == 0 and r.zcard(UNACKED_INDEX) == 0 and r.llen(QUEUE) == 5
    back = q.claim(5)
    assert sorted(json.loads(raw)["headers"]["id"] for _, raw in back) == sorted(queued)
    assert all(json.loads(raw)["headers"].get("redelivered") for _, raw in back
               if json.loads(raw)["headers"]["id"] in queued[:4])


class _SilentRedis:
    """A server that answers every command with +OK except BLMOVE, which it never answers: what a queue
    watch sees on a half-open connection (a dropped NAT entry, a failover)."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.blmoves = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\r\n" in buf:  # one RESP array per command: count its bulk strings, answer or not
                head, _, rest = buf.partition(b"\r\n")
                n = int(head[1:])
                parts, cur = [], rest
                for _ in range(n):
                    _, _, cur = cur.partition(b"\r\n")  # $len
                    item, _, cur = cur.partition(b"\r\n")
                    parts.append(item)
                buf = cur
                if parts and parts[0].upper() == b"BLMOVE":
                    self.blmoves += 1
                else:
                    conn.sendall(b"+OK\r\n")

    def close(self):
        self.sock.close()


class _Hub:
    def __init__(self):
        self.timers, self.readers = [], {}

    def call_later(self, delay, fn, *args):
        self.timers.append((delay, fn, args))

    def add_reader(self, fd, fn):
        self.readers[fd] = fn

    def remove_reader(self, fd):
        self.readers.pop(fd, None)


def test_a_queue_watch_that_never_answers_is_dropped_and_the_worker_claims_again():
    import redis as redis_lib

    from worker.consumer import WATCH_GRACE_S, WATCH_TIMEOUT_S, QueueWatch

    server = _SilentRedis()
    woken = []
    try:
        client = redis_lib.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=2, protocol=2)
        watch = QueueWatch(client, QUEUE, on_ready=lambda: woken.append(1), log=logs_stub())
        hub = _Hub()
        watch.start(hub)
        assert watch.arm() and watch.armed
        delay, check, args = hub.timers[-1]
        assert delay == WATCH_TIMEOUT_S + WATCH_GRACE_S
        deadline = time.monotonic() + 5
        while server.blmoves == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.blmoves == 1  # the BLMOVE went out and got no answer
        check(*args)  # the grace period is over: dropped, and the consumer is told to claim again
        assert not watch.armed and watch.conn is None and not hub.readers
        assert woken == [1]
        # a new watch (reconnecting is throttled to once a second) is left alone by the old check
        time.sleep(WATCH_TIMEOUT_S + 0.05)
        assert watch.arm()
        check(*args)
        assert watch.armed and woken == [1]
        watch.stop()
    finally:
        server.close()


def logs_stub():
    from sdfleet import logs

    return logs.get("test")
