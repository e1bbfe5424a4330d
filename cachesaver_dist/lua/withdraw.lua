-- Withdraw the claims of requests that gave up because no batch worker serves their
-- model (NoWorkerError): a worker started later would otherwise generate, and charge
-- for, samples nobody waits for.
--
-- KEYS: the model's work stream, then the prompt key's samples, generation and waiters
-- ARGV: prompt key, how many stream entries to look at (newest first), the batch
--   workers' consumer group, the number of waiter ids, the waiter ids, then the claimed
--   indices
-- Only entries never handed to a batch worker (after the group's last delivered id) are
-- touched: one a worker holds, alive or not, is left to it. Such an entry of the prompt
-- key whose indices are all withdrawn is deleted, and its indices without a sample are
-- released (claimed again by the next request that needs them); an entry that also
-- holds other indices is left as it is. The requests' waiter records are removed.
-- Returns {entries deleted, indices released}.
local stream, skey, gkey, wkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, scan, group, nwaiters = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local withdrawn = {}
for i = 5 + nwaiters, #ARGV do withdrawn[ARGV[i]] = true end

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local last_ms, last_seq = 0, 0  -- the group's last delivered id (none: 0-0)
local groups = redis.pcall('XINFO', 'GROUPS', stream)
if type(groups) == 'table' and not groups.err then
  for _, info in ipairs(groups) do
    local name, delivered = nil, nil
    for j = 1, #info, 2 do
      if info[j] == 'name' then name = info[j + 1] end
      if info[j] == 'last-delivered-id' then delivered = info[j + 1] end
    end
    if name == group and delivered then last_ms, last_seq = id_parts(delivered) end
  end
end

local deleted, freed = 0, {}
for _, entry in ipairs(redis.call('XREVRANGE', stream, '+', '-', 'COUNT', scan)) do
  local ms, seq = id_parts(entry[1])
  if ms < last_ms or (ms == last_ms and seq <= last_seq) then break end  -- delivered
  local fields, ekey, idx = entry[2], nil, nil
  for j = 1, #fields, 2 do
    if fields[j] == 'key' then ekey = fields[j + 1] elseif fields[j] == 'idx' then idx = fields[j + 1] end
  end
  if ekey == key and idx then
    local all = true
    for i in string.gmatch(idx, '[^,]+') do
      if not withdrawn[i] then all = false break end
    end
    if all and redis.call('XDEL', stream, entry[1]) == 1 then
      deleted = deleted + 1
      for i in string.gmatch(idx, '[^,]+') do freed[#freed + 1] = i end
    end
  end
end

local released = 0
for _, i in ipairs(freed) do
  if redis.call('HEXISTS', skey, i) == 0 then
    released = released + redis.call('HSET', gkey, 'x' .. i, 1)
  end
end
for i = 5, 4 + nwaiters do redis.call('HDEL', wkey, ARGV[i]) end
return {deleted, released}
