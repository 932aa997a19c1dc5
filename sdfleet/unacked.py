"""Claiming, acknowledging and handing back queue messages in bulk, in kombu's own bookkeeping.

kombu's Redis transport keeps every delivered, unacknowledged message in the hash ``unacked`` (field: the
message's delivery tag; value: JSON ``[message, exchange, routing_key]``) and its delivery time in the
sorted set ``unacked_index``. kombu hands entries older than the visibility timeout back to their queue;
the janitor hands back those of dead workers sooner. The GPU worker takes its messages with the scripts
here instead of through kombu, writing exactly those entries, so both keep working unchanged:

- :meth:`BulkQueue.claim` moves up to N messages from the queue into that bookkeeping and into the
  worker's held set in one script, after settling the acknowledgements gathered since the last call. A
  worker killed mid-claim cannot lose a message between the pop and the record (kombu pops, then records).
- :meth:`BulkQueue.requeue` puts messages back at the head of their queue, only if still unacknowledged.

Needs Redis 6.2 or newer (RPOP with a count).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

# The Redis transport's own bookkeeping keys (kombu.transport.redis defaults).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"

# KEYS: queue, unacked, unacked index, held set. ARGV: how many to claim, now, number of acknowledgements,
# then each acknowledgement as a (delivery tag, held id) pair.
# Returns (delivery tag, item) pairs in queue order; the tag is '' for an item that could not be recorded
# (not JSON, or no delivery tag or delivery info): it is off the queue and is the caller's to drop.
_CLAIM = """
local nacks = tonumber(ARGV[3])
for i = 4, 3 + 2 * nacks, 2 do
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
  if ARGV[i + 1] ~= '' then redis.call('SREM', KEYS[4], ARGV[i + 1]) end
end
local want = tonumber(ARGV[1])
if want < 1 then return {} end
local items = redis.call('RPOP', KEYS[1], want)
if not items then return {} end
local out = {}
for _, raw in ipairs(items) do
  local tag = ''
  local ok, msg = pcall(cjson.decode, raw)
  if ok and type(msg) == 'table' and type(msg.properties) == 'table' then
    local props = msg.properties
    local info = props.delivery_info
    if type(props.delivery_tag) == 'string' and props.delivery_tag ~= '' and type(info) == 'table'
        and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
      tag = props.delivery_tag
      -- kombu's value: [message, exchange, routing_key]; the message is kept byte for byte.
      redis.call('HSET', KEYS[2], tag,
        '[' .. raw .. ', ' .. cjson.encode(info.exchange) .. ', ' .. cjson.encode(info.routing_key) .. ']')
      redis.call('ZADD', KEYS[3], ARGV[2], tag)
      if type(msg.headers) == 'table' and type(msg.headers.id) == 'string' then
        redis.call('SADD', KEYS[4], msg.headers.id)
      end
    end
  end
  out[#out + 1] = tag
  out[#out + 1] = raw
end
return out
"""

# KEYS: queue, unacked, unacked index, held set. ARGV: (delivery tag, held id, item) triples.
# An item still unacknowledged goes back to the head of the queue (consumers pop from the right); one
# acknowledged or handed back meanwhile (by the janitor, say) is not pushed twice. Returns how many went back.
_REQUEUE = """
local n = 0
for i = 1, #ARGV, 3 do
  if redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    redis.call('ZREM', KEYS[3], ARGV[i])
    redis.call('RPUSH', KEYS[1], ARGV[i + 2])
    n = n + 1
  end
  if ARGV[i + 1] ~= '' then redis.call('SREM', KEYS[4], ARGV[i + 1]) end
end
return n
"""


class BulkQueue:
    """One queue, consumed in bulk by one worker whose held set is ``held_key``."""

    def __init__(self, client: redis.Redis, queue: str, held_key: str):
        self.r = client
        self.queue = queue
        self.keys = [queue, UNACKED, UNACKED_INDEX, held_key]
        self._claim = client.register_script(_CLAIM)
        self._requeue = client.register_script(_REQUEUE)

    def claim(self, n: int, acks: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
        """Settle ``acks`` ((delivery tag, held id) pairs), then claim up to ``n`` messages.

        Returns (delivery tag, item) pairs, oldest first; tag '' marks an item that was not recorded.
        """
        args: list[str | int | float] = [n, time.time(), len(acks)]
        for tag, held_id in acks:
            args += [tag, held_id]
        flat = self._claim(keys=self.keys, args=args)
        return list(zip(flat[::2], flat[1::2]))

    def requeue(self, items: Sequence[tuple[str, str, str]]) -> int:
        """Put (delivery tag, held id, item) triples, oldest first, back at the head of the queue, in
        that order, each only if still unacknowledged. Returns how many went back."""
        if not items:
            return 0
        # Pushed newest first, so the oldest ends up next in line again.
        return int(self._requeue(keys=self.keys, args=[x for item in reversed(items) for x in item]))
