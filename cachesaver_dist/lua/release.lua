-- Release claimed indices whose generation failed for good, and collect the
-- waiters that depended on them so they can be told the error.
--
-- KEYS: samples, generation, waiters
-- ARGV: index, index, ...
-- A released index is claimed again by the next request that needs it.
-- Returns {waiters, malformed}: {waiter_id, record} of each waiter removed; malformed
-- as in fill.lua.
-- A key of another type than a hash is treated as empty (the caller sets it aside).
local function foreign(key)
  local t = redis.call('TYPE', key)['ok']
  return t ~= 'hash' and t ~= 'none'
end

local skey, gkey, wkey = KEYS[1], KEYS[2], KEYS[3]
if foreign(gkey) or foreign(wkey) then return {{}, {}} end
local stored = not foreign(skey)
local released = {}
for i = 1, #ARGV do
  local idx = tonumber(ARGV[i])
  if not stored or redis.call('HEXISTS', skey, idx) == 0 then
    redis.call('HSET', gkey, 'x' .. idx, 1)
    released[idx] = true
  end
end

local out, malformed = {}, {}
local waiters = redis.call('HGETALL', wkey)
for i = 1, #waiters, 2 do
  local s, flags = string.match(waiters[i + 1], '^(%d+)|(%a*)|.')
  if not s then
    redis.call('HDEL', wkey, waiters[i])
    table.insert(malformed, wkey)
    table.insert(malformed, waiters[i])
    table.insert(malformed, waiters[i + 1])
  else
    local start = tonumber(s)
    for idx = start, start + #flags - 1 do
      if released[idx] then
        redis.call('HDEL', wkey, waiters[i])
        out[#out + 1] = {waiters[i], waiters[i + 1]}
        break
      end
    end
  end
end
return {out, malformed}
