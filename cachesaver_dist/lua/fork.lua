-- Copy a run's namespace counters to a new run (cachesaver-dist fork RUN NEW), so NEW
-- continues the experiment from RUN's checkpoint: every (prompt key, namespace) of NEW
-- starts where RUN's stood. The manifest and stats are not copied.
--
-- KEYS: usage of RUN, usage of NEW, manifest of NEW, stats of NEW, runs
-- ARGV: NEW, now (s), usage_ttl_ms (0 = keep NEW's counters without expiry)
-- Returns the number of counters copied; -1 when RUN has no counters; -2 when NEW exists
-- (it has counters, a manifest, stats or a place in the run index).
-- #include ttl
local ttl = ttl_ms(ARGV[3], 'the new run\'s time to live (--run-ttl)', 0)
if redis.call('EXISTS', KEYS[2], KEYS[3], KEYS[4]) > 0 or redis.call('ZSCORE', KEYS[5], ARGV[1]) then
  return -2
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
redis.call('COPY', KEYS[1], KEYS[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('PERSIST', KEYS[2])
end
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return redis.call('HLEN', KEYS[2])
