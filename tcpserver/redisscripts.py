"""The Lua scripts of the Redis engine, each run atomically by Redis.

Keys are documented in ``tcpserver.redislog`` (the log's) and
``tcpserver.redispresence`` (presence).  Every script that publishes a room
event splices the seq into a payload split around it and ``XADD``s it as
entry ``0-<seq>`` (``PUBLISH_ONE``), so events from a ``say``, a reap or a
resync share one sequence and one stream.
"""

# Shared by every script that publishes (KEYS[2] = seq, KEYS[3] = stream,
# ARGV[2] = retain): the next seq, spliced between the payload's two halves,
# appended as entry 0-<seq>.  The stream holds JSON payloads; each node
# frames them with tcpserver.protocol, the one codec (no second encoder of
# the length header lives in Lua).
PUBLISH_ONE = """
local function publish(head, tail)
  local seq = redis.call('INCR', KEYS[2])
  local payload = head .. seq .. tail
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '0-' .. seq,
             'f', payload)
  return seq
end
"""

PUBLISH = """
-- KEYS: epoch, seq, stream.  ARGV: epoch, retain, then (prefix, suffix) pairs.
""" + PUBLISH_ONE + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('EPOCH the room epoch changed')
end
local seq
for i = 3, #ARGV, 2 do
  seq = publish(ARGV[i], ARGV[i + 1])
end
return seq
"""


ADOPT = """
-- KEYS: epoch, seq, stream, names, index.  ARGV: the epoch lost, a new one.
-- The first node to notice starts the new transcript; the others adopt it.
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return cur
"""


_SPLIT = "local n, tok, label = string.match(v, '^([^\\n]*)\\n([^\\n]*)\\n(.*)$')\n"

CLAIM = """
-- KEYS: names, index.  ARGV: prefix, node, key, value, resume.
local v = redis.call('HGET', KEYS[1], ARGV[3])
local out = {1, 0, '', '', ''}
if v then
""" + _SPLIT + """
  if ARGV[5] == '' or tok ~= ARGV[5] then return {0} end
  redis.call('SREM', ARGV[1] .. 'node:' .. n .. ':members', ARGV[3])
  out[3], out[4], out[5] = n, tok, label
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
redis.call('SADD', ARGV[1] .. 'node:' .. ARGV[2] .. ':members', ARGV[3])
out[2] = redis.call('HLEN', KEYS[1])
return out
"""

ROSTER = """
-- KEYS: names.  ARGV: announce_limit.  {HLEN, and every key, value if small}.
local out = {redis.call('HLEN', KEYS[1])}
if out[1] <= tonumber(ARGV[1]) then
  for _, x in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = x end
end
return out
"""

RELEASE = """
-- KEYS: names, index.  ARGV: prefix, node, key, token.
local v = redis.call('HGET', KEYS[1], ARGV[3])
if v then
""" + _SPLIT + """
  if tok == ARGV[4] then
    redis.call('HDEL', KEYS[1], ARGV[3])
    redis.call('ZREM', KEYS[2], ARGV[3])
    redis.call('SREM', ARGV[1] .. 'node:' .. n .. ':members', ARGV[3])
  end
end
return redis.call('HLEN', KEYS[1])
"""

SYNC = """
-- KEYS: epoch, seq, stream, names, index.  ARGV: epoch, retain, prefix, node,
-- ts, announce_limit, then (key, value) pairs: this node's members now
-- (value '' for a name whose claim is still on its way).
-- Run on each reconnect: puts back members that are missing (returns their
-- keys), and takes out, with a leave, those that left while Redis was away.
""" + PUBLISH_ONE + """
local live = redis.call('GET', KEYS[1]) == ARGV[1]
local set = ARGV[3] .. 'node:' .. ARGV[4] .. ':members'
local mine, missing = {}, {}
for i = 7, #ARGV, 2 do
  mine[ARGV[i]] = true
  -- An empty value: a claim still on its way (left as it is).
  if ARGV[i + 1] ~= '' then
    if redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]) == 1 then
      redis.call('ZADD', KEYS[5], 0, ARGV[i])
      missing[#missing + 1] = ARGV[i]
    end
    if redis.call('HGET', KEYS[4], ARGV[i]) == ARGV[i + 1] then
      redis.call('SADD', set, ARGV[i])
    end
  end
end
for _, key in ipairs(redis.call('SMEMBERS', set)) do
  if not mine[key] then
    redis.call('SREM', set, key)
    local v = redis.call('HGET', KEYS[4], key)
    if v then
""" + _SPLIT + """
      if n == ARGV[4] then
        redis.call('HDEL', KEYS[4], key)
        redis.call('ZREM', KEYS[5], key)
        if live and redis.call('HLEN', KEYS[4]) < tonumber(ARGV[6]) then
          publish('{"type":"leave","member":' .. label .. ',"reason":"hung_up","ts":'
                  .. ARGV[5] .. ',"seq":', '}')
        end
      end
    end
  end
end
return missing
"""

REAP = """
-- KEYS: epoch, seq, stream, nodes, names, index.
-- ARGV: epoch, retain, prefix, ts, announce_limit, reason, node ('' = every
-- node whose alive key is gone).  Returns how many members left.
""" + PUBLISH_ONE + """
local gone = 0
local nodes = redis.call('SMEMBERS', KEYS[4])
if ARGV[7] ~= '' then nodes = {ARGV[7]} end
local live = redis.call('GET', KEYS[1]) == ARGV[1]
for _, node in ipairs(nodes) do
  local base = ARGV[3] .. 'node:' .. node
  if ARGV[7] ~= '' or redis.call('EXISTS', base .. ':alive') == 0 then
    for _, key in ipairs(redis.call('SMEMBERS', base .. ':members')) do
      local v = redis.call('HGET', KEYS[5], key)
      if v then
""" + _SPLIT + """
        if n == node then
          redis.call('HDEL', KEYS[5], key)
          redis.call('ZREM', KEYS[6], key)
          gone = gone + 1
          if live and redis.call('HLEN', KEYS[5]) < tonumber(ARGV[5]) then
            publish('{"type":"leave","member":' .. label .. ',"reason":"' .. ARGV[6]
                    .. '","ts":' .. ARGV[4] .. ',"seq":', '}')
          end
        end
      end
    end
    redis.call('DEL', base .. ':members', base .. ':inbox', base .. ':alive')
    redis.call('SREM', KEYS[4], node)
  end
end
return gone
"""

WHO = """
-- KEYS: names, index.  ARGV: min, max, count.  Returns {HLEN, key, value, ...}.
local out = {redis.call('HLEN', KEYS[1])}
for _, key in ipairs(redis.call('ZRANGEBYLEX', KEYS[2], ARGV[1], ARGV[2], 'LIMIT', 0,
                                ARGV[3])) do
  out[#out + 1] = key
  out[#out + 1] = redis.call('HGET', KEYS[1], key) or ''
end
return out
"""
