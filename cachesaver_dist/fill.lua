-- Store generated samples and collect the waiters they complete (DESIGN section 4).
--
-- KEYS: samples, generation, waiters
-- ARGV: index, sample, index, sample, ...
-- Samples are set-if-absent: a late or repeated fill changes nothing.
-- Returns {waiter_id, waiter_record, sample...} for every waiter now complete.
local skey, gkey, wkey = KEYS[1], KEYS[2], KEYS[3]
local lo, hi = math.huge, -1
for i = 1, #ARGV, 2 do
  local idx = tonumber(ARGV[i])
  redis.call('HSETNX', skey, idx, ARGV[i + 1])
  redis.call('HDEL', gkey, 'x' .. idx)
  if idx < lo then lo = idx end
  if idx > hi then hi = idx end
end

local out = {}
local waiters = redis.call('HGETALL', wkey)
for i = 1, #waiters, 2 do
  local record = waiters[i + 1]
  local s, flags = string.match(record, '^(%d+)|(%a*)|')
  local start = tonumber(s)
  local last = start + #flags - 1
  if start <= hi and last >= lo then
    local samples = {}
    local complete = true
    for idx = start, last do
      local sample = redis.call('HGET', skey, idx)
      if not sample then complete = false break end
      samples[#samples + 1] = sample
    end
    if complete then
      redis.call('HDEL', wkey, waiters[i])
      table.insert(samples, 1, record)
      table.insert(samples, 1, waiters[i])
      out[#out + 1] = samples
    end
  end
end
return out
