-- Merge archived samples into the cache (cachesaver-dist import), for one or more prompt
-- keys per call.
--
-- KEYS: per prompt key 3: samples, generation, model index (untouched when spec is '')
-- ARGV: per prompt key: prompt key, spec ('' = none), count, then count pairs of index,
--   sample
-- Append-only: a sample is written only where there is none; one that differs from the
-- stored sample is reported, never written, and an equal one is counted as present (so a
-- re-import changes nothing). The key's mark is raised to cover the imported indices;
-- indices between the old mark and the new one that hold no sample are marked released
-- (x<i>), so the next request that needs one claims it. A written sample clears the
-- released mark of its index. The spec is set if the key has none, and then the key is
-- added to its model's index, as reserve.lua does on a first claim.
-- Returns per prompt key {written, present, {index...} of the disagreeing samples}.
local out = {}
local a = 1
for k = 0, #KEYS / 3 - 1 do
  local skey, gkey, mkey = KEYS[k * 3 + 1], KEYS[k * 3 + 2], KEYS[k * 3 + 3]
  local pkey, spec, count = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  local mark = tonumber(redis.call('HGET', gkey, 'mark') or '0')
  if not mark then
    return redis.error_reply('CORRUPT generation state ' .. gkey .. ': mark is not a number')
  end
  local written, present, differ, top = 0, 0, {}, -1
  for _ = 1, count do
    local idx, sample = tonumber(ARGV[a]), ARGV[a + 1]
    a = a + 2
    local old = redis.call('HGET', skey, idx)
    if not old then
      redis.call('HSET', skey, idx, sample)
      redis.call('HDEL', gkey, 'x' .. idx)
      written = written + 1
    elseif old == sample then
      present = present + 1
    else
      differ[#differ + 1] = idx
    end
    if idx > top then top = idx end
  end
  if top + 1 > mark then
    for idx = mark, top - 1 do
      if redis.call('HEXISTS', skey, idx) == 0 then
        redis.call('HSET', gkey, 'x' .. idx, 1)
      end
    end
    redis.call('HSET', gkey, 'mark', top + 1)
  end
  if spec ~= '' and redis.call('HSETNX', gkey, 'spec', spec) == 1 then
    redis.call('SADD', mkey, pkey)
  end
  out[#out + 1] = {written, present, differ}
end
return out
