-- Reserve sample indices for a batch of requests, atomically (DESIGN section 4).
--
-- Formats: waiter records, stream entries, manifest entries and reservation records as in
-- protocol.py (WaiterRecord, StreamEntry, ManifestEntry, Keys.reservations).
-- KEYS: per request 3: samples, generation, waiters; then per group of requests that
--   share them (one client batch of one run and model), 5: usage counters, work stream,
--   model index, manifest, reservation records.
-- ARGV: reservation_ttl_ms, usage_ttl_ms, then per request 8 values:
--   namespace, n, waiter_id, waiter_tail ("run|model"), prompt_key, spec,
--   group (KEYS position of the request's group: its usage key; the other four follow),
--   manifest_field ('' = the run keeps no manifest, or the request has no request_id)
-- Returns {results, stopped_at}. Per request reserved, {complete, new, start, flags,
-- sample...}: complete = 1 when every sample exists (they follow), new = 1 on the first
-- reservation of that request (its waiter id). Flags per index: c = cached, d = generated
-- by someone else, g = claimed here. Claimed indices go to the work stream as one entry
-- per (stream, prompt key), with the request's spec.
--
-- A hit costs its counter increment and one read of its samples: the generation state is
-- read only when a sample is missing (a stored sample's index is always below the mark).
-- Reservation records (waiter id -> 'start|flags') are one hash per client batch, read
-- once and written once per call; the client deletes it when the batch is answered.
--
-- A claim also keeps the claiming spec in the generation hash (field spec, set if
-- absent) and, when it is new there, adds the prompt key to the model's index: both only
-- on a claim, never on a hit. A new reservation of a request with a manifest field
-- records '<key>|<start>|<n>' under it (the first reservation wins; a later different one
-- marks the entry ambiguous with '|*'), in the same atomic step.
--
-- A spec only matters to a claim, so callers send empty specs first (hits then carry
-- no prompt): the first request that would claim without a spec is left untouched,
-- and stopped_at is its 0-based position (-1 when all were reserved); the caller sends
-- that request and those after it again, with their specs.
local reservation_ttl = tonumber(ARGV[1])
local usage_ttl = tonumber(ARGV[2])
local out = {}
local claims, claim_by = {}, {}
local stopped_at = -1
local failure = nil  -- an error reply: the requests before it keep their reservations
local records, new_records, touched = {}, {}, {}

local function records_of(rkey)
  local found = records[rkey]
  if not found then
    found = {}
    local flat = redis.call('HGETALL', rkey)
    for j = 1, #flat, 2 do found[flat[j]] = flat[j + 1] end
    records[rkey] = found
  end
  return found
end

-- The samples of indices start .. start + n - 1 (nil where missing), or nil and Redis's
-- error when the samples key holds another type.
local function read_samples(skey, start, n)
  local got
  if n <= 128 then
    local fields = {}
    for idx = start, start + n - 1 do fields[#fields + 1] = idx end
    got = redis.pcall('HMGET', skey, unpack(fields))
  else
    got = {}
    for idx = start, start + n - 1 do
      local sample = redis.pcall('HGET', skey, idx)
      if type(sample) == 'table' and sample.err then got = sample break end
      got[idx - start + 1] = sample
    end
  end
  if got.err then return nil, got end
  return got, nil
end

for i = 0, (#ARGV - 2) / 8 - 1 do
  local skey, gkey, wkey = KEYS[i * 3 + 1], KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local a = 2 + i * 8
  local ns, n, waiter, tail = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4]
  local pkey, spec, group, mfield = ARGV[a + 5], ARGV[a + 6], tonumber(ARGV[a + 7]), ARGV[a + 8]
  local ukey, ufield, rkey = KEYS[group], pkey .. ns, KEYS[group + 4]

  local start, old_flags, new = nil, nil, 0
  local record = records_of(rkey)[waiter]
  local s, f = nil, nil
  if record then s, f = string.match(record, '^(%d+)|(%a*)$') end
  if s and #f == n then
    start, old_flags = tonumber(s), f
  else  -- no record, or one that is unreadable: a new range (never an old index twice)
    start = redis.call('HINCRBY', ukey, ufield, n) - n
    new = 1
  end

  local got, unreadable = read_samples(skey, start, n)
  local flags, samples, complete = {}, {}, unreadable == nil
  for j = 1, unreadable and 0 or n do
    if got[j] then
      samples[#samples + 1] = got[j]
      flags[j] = old_flags and string.sub(old_flags, j, j) or 'c'
    else
      complete = false
    end
  end

  local mark = nil
  if not complete then
    mark = tonumber(redis.call('HGET', gkey, 'mark') or '0')
    if not mark then
      failure = redis.error_reply('CORRUPT generation state ' .. gkey .. ': mark is not a number')
    elseif unreadable and start < mark then
      -- Samples below the mark should be there: an unreadable samples key fails the call.
      -- Above it nothing is stored yet: the fill that comes sets the key aside.
      failure = unreadable
    end
    if failure then
      if new == 1 and redis.call('HINCRBY', ukey, ufield, -n) == 0 then
        redis.call('HDEL', ukey, ufield)
      end
      break
    end
    local need_spec = spec == '' and start + n > mark
    for idx = start, math.min(start + n, mark) - 1 do
      if need_spec then break end
      if not flags[idx - start + 1] and spec == '' and
          redis.call('HEXISTS', gkey, 'x' .. idx) == 1 then
        need_spec = true
      end
    end
    if need_spec then
      if new == 1 and redis.call('HINCRBY', ukey, ufield, -n) == 0 then
        redis.call('HDEL', ukey, ufield)
      end
      stopped_at = i
      break
    end
  end
  if not touched[group] then
    redis.call('PEXPIRE', ukey, usage_ttl)
    touched[group] = true
  end
  if new == 1 and mfield ~= '' then
    local mkey = KEYS[group + 3]
    if redis.call('HSETNX', mkey, mfield, pkey .. '|' .. start .. '|' .. n) == 0 then
      local first = redis.call('HGET', mkey, mfield)
      if string.sub(first, -2) ~= '|*' then redis.call('HSET', mkey, mfield, first .. '|*') end
    end
    redis.call('PEXPIRE', mkey, usage_ttl)
  end

  if not complete then
    for idx = start, start + n - 1 do
      local j = idx - start + 1
      if not flags[j] then
        if idx >= mark or redis.call('HDEL', gkey, 'x' .. idx) == 1 then
          local stream = KEYS[group + 1]
          local id = stream .. '\0' .. pkey
          local claim = claim_by[id]
          if not claim then
            claim = {stream, pkey, spec, {}, gkey, KEYS[group + 2]}
            claim_by[id] = claim
            claims[#claims + 1] = claim
          end
          table.insert(claim[4], idx)
          flags[j] = 'g'
        else
          flags[j] = old_flags and string.sub(old_flags, j, j) or 'd'
        end
      end
    end
    if start + n > mark then
      for idx = mark, start - 1 do redis.call('HSET', gkey, 'x' .. idx, 1) end
      redis.call('HSET', gkey, 'mark', start + n)
    end
  end

  local fl = table.concat(flags)
  if fl ~= old_flags then  -- written once at the end; seen at once by a repeat
    records[rkey][waiter] = start .. '|' .. fl
    local list = new_records[rkey]
    if not list then
      list = {}
      new_records[rkey] = list
    end
    list[#list + 1] = waiter
    list[#list + 1] = start .. '|' .. fl
  end
  if complete then
    local entry = {1, new, start, fl}
    for _, sample in ipairs(samples) do entry[#entry + 1] = sample end
    out[#out + 1] = entry
  else
    redis.call('HSET', wkey, waiter, start .. '|' .. fl .. '|' .. tail)
    out[#out + 1] = {0, new, start, fl}
  end
end

for rkey, list in pairs(new_records) do
  for j = 1, #list, 200 do
    redis.call('HSET', rkey, unpack(list, j, math.min(j + 199, #list)))
  end
  redis.call('PEXPIRE', rkey, reservation_ttl)
end
for _, claim in ipairs(claims) do
  redis.call('XADD', claim[1], '*', 'key', claim[2], 'idx', table.concat(claim[4], ','),
    'spec', claim[3])
  if redis.call('HSETNX', claim[5], 'spec', claim[3]) == 1 then
    redis.call('SADD', claim[6], claim[2])
  end
end
if failure then return failure end
return {out, stopped_at}
