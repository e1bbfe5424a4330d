-- Delete the samples of one prompt key, unless the key is being generated
-- (cachesaver-dist prune).
--
-- KEYS: samples, generation, waiters, model index (untouched when ARGV[2] is '')
-- ARGV: mode ('dry' counts, writes nothing; 'real' deletes), the prompt key as the model
--   index holds it ('' when the key has no spec, so no index entry), then pairs of index,
--   the sample's bytes as read. No pairs: the whole key.
-- A key is being generated when a request waits on it or when an index below its mark has
-- neither a sample nor a released mark (x<i>): then nothing is deleted and -1 returned.
-- With pairs, a sample is deleted only if it still holds those bytes, and its index is
-- marked released, so the next request that needs it claims it again. Without pairs, or
-- when no sample is left, the key goes whole: samples, generation hash (mark, spec,
-- released marks) and its entry in the model index. Returns {samples deleted, 1 if the key
-- went whole else 0}.
local skey, gkey, wkey, mkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local real, pkey = ARGV[1] == 'real', ARGV[2]
if redis.call('EXISTS', wkey) == 1 then
  return {-1, 0}
end
local mark = tonumber(redis.call('HGET', gkey, 'mark') or '0') or 0
for idx = 0, mark - 1 do
  if redis.call('HEXISTS', skey, idx) == 0 and redis.call('HEXISTS', gkey, 'x' .. idx) == 0 then
    return {-1, 0}
  end
end
local removed = 0
if #ARGV == 2 then
  removed = redis.call('HLEN', skey)
else
  for i = 3, #ARGV, 2 do
    if redis.call('HGET', skey, ARGV[i]) == ARGV[i + 1] then
      removed = removed + 1
      if real then
        redis.call('HDEL', skey, ARGV[i])
        redis.call('HSET', gkey, 'x' .. ARGV[i], 1)
      end
    end
  end
  if redis.call('HLEN', skey) > (real and 0 or removed) then
    return {removed, 0}
  end
end
if real then
  redis.call('DEL', skey, gkey)
  if pkey ~= '' then
    redis.call('SREM', mkey, pkey)
  end
end
return {removed, 1}
