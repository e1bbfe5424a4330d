-- Withdraw the claims of requests that gave up because no batch worker serves their
-- model (NoWorkerError): a worker started later would otherwise generate, and charge
-- for, samples nobody waits for.
--
-- KEYS: the model's work stream, then the prompt key's samples, generation and waiters
-- ARGV: prompt key, how many stream entries to look at (newest first), the number of
--   waiter ids, the waiter ids, then the claimed indices
-- The stream entries of the prompt key whose indices are all withdrawn are deleted;
-- each withdrawn index without a sample is released (claimed again by the next request
-- that needs it); the requests' waiter records are removed. An entry that also holds
-- other indices is left as it is. Returns {entries deleted, indices released}.
local stream, skey, gkey, wkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, scan, nwaiters = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local withdrawn = {}
for i = 4 + nwaiters, #ARGV do withdrawn[ARGV[i]] = true end

local deleted = 0
for _, entry in ipairs(redis.call('XREVRANGE', stream, '+', '-', 'COUNT', scan)) do
  local fields, ekey, idx = entry[2], nil, nil
  for j = 1, #fields, 2 do
    if fields[j] == 'key' then ekey = fields[j + 1] elseif fields[j] == 'idx' then idx = fields[j + 1] end
  end
  if ekey == key and idx then
    local all = true
    for i in string.gmatch(idx, '[^,]+') do
      if not withdrawn[i] then all = false break end
    end
    if all then deleted = deleted + redis.call('XDEL', stream, entry[1]) end
  end
end

local released = 0
for i = 4 + nwaiters, #ARGV do
  if redis.call('HEXISTS', skey, ARGV[i]) == 0 then
    released = released + redis.call('HSET', gkey, 'x' .. ARGV[i], 1)
  end
end
for i = 4, 3 + nwaiters do redis.call('HDEL', wkey, ARGV[i]) end
return {deleted, released}
