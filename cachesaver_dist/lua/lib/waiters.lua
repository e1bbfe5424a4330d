-- Shared by fill.lua and import_samples.lua (put in place of their `-- #include waiters`
-- line by scripts.source): the waiters of a prompt key whose ranges overlap [lo, hi] and
-- whose samples are now all stored are removed and returned as {waiter_id,
-- waiter_record, sample...}; unreadable waiter records (protocol.WaiterRecord) are
-- removed and appended to `malformed` as waiters key, waiter id, record.
local function completed(skey, wkey, lo, hi, malformed)
  local out = {}
  local waiters = redis.call('HGETALL', wkey)
  for i = 1, #waiters, 2 do
    local record = waiters[i + 1]
    local s, flags = string.match(record, '^(%d+)|(%a*)|.')
    if not s then
      redis.call('HDEL', wkey, waiters[i])
      table.insert(malformed, wkey)
      table.insert(malformed, waiters[i])
      table.insert(malformed, record)
    else
      local start = tonumber(s)
      local last = start + #flags - 1
      if start <= hi and last >= lo then
        local entry = {waiters[i], record}
        for idx = start, last do
          local sample = redis.call('HGET', skey, idx)
          if not sample then entry = nil break end
          entry[#entry + 1] = sample
        end
        if entry then
          redis.call('HDEL', wkey, waiters[i])
          out[#out + 1] = entry
        end
      end
    end
  end
  return out
end
