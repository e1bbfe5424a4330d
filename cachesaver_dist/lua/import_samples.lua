-- Import the samples an original CacheSaver folder holds for prompt keys, once per key
-- (docs/migrate.md), for one or more prompt keys in one call.
--
-- KEYS: per prompt key 3 keys: samples, generation, waiters
-- ARGV: per prompt key: origin (the original's key, recorded), count m, then m samples
--   for indices 0..m-1, each an encoded sample or '' for one that was skipped
-- A key whose generation hash has the field 'imported' is left as it is. Otherwise each
-- sample is stored set-if-absent (an index that holds a sample keeps it) and its
-- released mark is cleared; a skipped index that nobody has claimed (at or above mark)
-- is marked released (x<i>), so the next request that needs it claims and generates
-- it; mark is raised to at least m; 'imported' = m and 'imported_from' = origin.
-- Returns {per_key, malformed}: per prompt key {status, stored, waiter...}: status 1 when
-- imported by this call, 0 when it was imported before; stored: samples written; each
-- waiter as in fill.lua, {waiter_id, waiter_record, sample...}, for every waiter now
-- complete (removed). Waiters exist only when a client without the folder reserved the
-- key first. malformed as in fill.lua.
-- #include waiters

local result, malformed = {}, {}
local a = 1
for k = 0, #KEYS / 3 - 1 do
  local skey, gkey, wkey = KEYS[k * 3 + 1], KEYS[k * 3 + 2], KEYS[k * 3 + 3]
  local origin, m = ARGV[a], tonumber(ARGV[a + 1])
  local first = a + 2
  a = first + m
  if redis.call('HEXISTS', gkey, 'imported') == 1 then
    result[#result + 1] = {0, 0}
  else
    local mark = tonumber(redis.call('HGET', gkey, 'mark') or '0')
    if not mark then
      return redis.error_reply('CORRUPT generation state ' .. gkey .. ': mark is not a number')
    end
    local stored = 0
    for idx = 0, m - 1 do
      local sample = ARGV[first + idx]
      if sample ~= '' then
        stored = stored + redis.call('HSETNX', skey, idx, sample)
        redis.call('HDEL', gkey, 'x' .. idx)
      elseif idx >= mark and redis.call('HEXISTS', skey, idx) == 0 then
        redis.call('HSET', gkey, 'x' .. idx, 1)
      end
    end
    if m > mark then redis.call('HSET', gkey, 'mark', m) end
    redis.call('HSET', gkey, 'imported', m, 'imported_from', origin)

    local out = {1, stored}
    for _, entry in ipairs(completed(skey, wkey, 0, m - 1, malformed)) do
      out[#out + 1] = entry
    end
    result[#result + 1] = out
  end
end
return {result, malformed}
