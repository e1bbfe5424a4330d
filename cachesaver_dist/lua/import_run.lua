-- Merge an archived run's counters or manifest entries (cachesaver-dist import).
--
-- KEYS: the run's counters (u:<run>) or manifest (m:<run>), the run index (runs)
-- ARGV: kind ('u' or 'm'), run, now (s), ttl_ms (0 = keep the key without expiry), then
--   pairs of field, value
-- Counters are raised to the archived value, never lowered (a live run keeps its place,
-- a re-import changes nothing). Manifest entries are set if absent; a different entry
-- already there is kept and reported. The key's lifetime is set to ttl_ms and the run
-- is added to the run index.
-- Returns {written, present, {field...} of the disagreeing manifest entries}.
local key, runs = KEYS[1], KEYS[2]
-- #include ttl
local kind, run, now = ARGV[1], ARGV[2], ARGV[3]
local ttl = ttl_ms(ARGV[4], 'the run\'s time to live (--run-ttl)', 0)
local written, present, differ = 0, 0, {}
for i = 5, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', key, field)
  if kind == 'u' then
    if not old or (tonumber(old) or 0) < tonumber(value) then
      redis.call('HSET', key, field, value)
      written = written + 1
    else
      present = present + 1
    end
  elseif not old then
    redis.call('HSET', key, field, value)
    written = written + 1
  elseif old == value then
    present = present + 1
  else
    differ[#differ + 1] = field
  end
end
if ttl > 0 then
  redis.call('PEXPIRE', key, ttl)
else
  redis.call('PERSIST', key)
end
redis.call('ZADD', runs, now, run)
return {written, present, differ}
