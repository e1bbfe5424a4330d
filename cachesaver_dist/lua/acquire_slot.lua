-- Take one of ARGV[2] concurrent-call slots of a model, cluster-wide.
-- KEYS[1]: sorted set, holder id -> expiry time in ms (Redis clock).
-- ARGV: holder id, limit, ttl_ms. Returns 1 if taken, 0 if all slots are held.
-- Holders past their expiry (their worker died mid-call) are dropped first.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
