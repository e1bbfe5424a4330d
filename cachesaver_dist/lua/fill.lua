-- Store generated samples and collect the waiters they complete (DESIGN section 4),
-- for one or more prompt keys in one call.
--
-- KEYS: per prompt key 3 keys: samples, generation, waiters
-- ARGV: per prompt key: count, then count pairs of index, sample
-- Samples are set-if-absent: a late or repeated fill changes nothing.
-- Returns {per_key, malformed, wrongtype}: per prompt key a list of {waiter_id,
-- waiter_record, sample...}, one for every waiter now complete; malformed: {waiters key,
-- waiter id, record, ...} of waiter records that are not 'start|flags|run|model'
-- (removed, so the caller can set them aside); wrongtype: the keys that hold another
-- type than a hash (that prompt key is left untouched: the caller sets those keys aside
-- and fills again). Waiter records: protocol.WaiterRecord.
local function foreign(key)
  local t = redis.call('TYPE', key)['ok']
  return t ~= 'hash' and t ~= 'none'
end

local function store(skey, gkey, a)
  local lo, hi = math.huge, -1
  for _ = 1, tonumber(ARGV[a]) do
    local idx = tonumber(ARGV[a + 1])
    redis.call('HSETNX', skey, idx, ARGV[a + 2])
    redis.call('HDEL', gkey, 'x' .. idx)
    if idx < lo then lo = idx end
    if idx > hi then hi = idx end
    a = a + 2
  end
  return lo, hi
end

-- #include waiters

local result, malformed, wrongtype = {}, {}, {}
local a = 1
for k = 0, #KEYS / 3 - 1 do
  local skey, gkey, wkey = KEYS[k * 3 + 1], KEYS[k * 3 + 2], KEYS[k * 3 + 3]
  local ok = true
  for _, key in ipairs({skey, gkey, wkey}) do
    if foreign(key) then
      table.insert(wrongtype, key)
      ok = false
    end
  end
  if ok then
    local lo, hi = store(skey, gkey, a)
    result[#result + 1] = completed(skey, wkey, lo, hi, malformed)
  else
    result[#result + 1] = {}
  end
  a = a + 1 + 2 * tonumber(ARGV[a])
end
return {result, malformed, wrongtype}
