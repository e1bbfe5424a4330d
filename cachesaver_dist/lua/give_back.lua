-- Give back the index ranges of requests that failed (their clients got the error and do
-- not ask again), as if those requests had never been made: the next request of the same
-- run, namespace and prompt key gets the same indices, so a retry after a failure costs
-- no more generation than a first try, and gets the samples a run without the failure
-- would have got (as in the original CacheSaver).
--
-- Formats: reservation records and manifest entries as in protocol.py (Keys.reservations,
-- ManifestEntry); counter fields as in reserve.lua (prompt key .. namespace).
-- KEYS: per request 3: its run's usage counters, its batch's reservation records, its
--   run's manifest
-- ARGV: per request 4: prompt key, namespace, waiter id, manifest field ('' for none)
-- A range is given back only when it is the last one its counter handed out (the counter
-- stands at its end): else a later request holds indices after it, and the range stays a
-- gap (never an index twice). Requests are taken last to first, so that consecutive
-- failures on one counter are all given back. In the same step the request's reservation
-- record goes (a late re-ask reserves anew) and so does its manifest entry, if it is
-- that range (the retry records it again).
-- Returns how many ranges were given back.
local given = 0
for i = #KEYS / 3, 1, -1 do
  local ukey, rkey, mkey = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = 4 * i - 4
  local pkey, namespace, waiter, mfield = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local record = redis.call('HGET', rkey, waiter)
  local s, flags = nil, nil
  if record then s, flags = string.match(record, '^(%d+)|(%a+)$') end
  if s then
    local start, n = tonumber(s), #flags
    local field = pkey .. namespace
    if tonumber(redis.call('HGET', ukey, field) or '') == start + n then
      if start == 0 then
        redis.call('HDEL', ukey, field)
      else
        redis.call('HSET', ukey, field, s)
      end
      redis.call('HDEL', rkey, waiter)
      local entry = pkey .. '|' .. s .. '|' .. string.format('%d', n)
      if mfield ~= '' and redis.call('HGET', mkey, mfield) == entry then
        redis.call('HDEL', mkey, mfield)
      end
      given = given + 1
    end
  end
end
return given
