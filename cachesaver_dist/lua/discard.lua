-- Set aside stored samples that cannot be read, so they are generated again.
--
-- KEYS: samples, generation
-- ARGV: pairs of index, the bytes found there
-- A sample is removed only if it still holds those bytes; its index is marked released
-- (x<i>), so the next request that needs it claims it again. Returns how many were removed.
local skey, gkey = KEYS[1], KEYS[2]
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', skey, ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', skey, ARGV[i])
    redis.call('HSET', gkey, 'x' .. ARGV[i], 1)
    removed = removed + 1
  end
end
return removed
