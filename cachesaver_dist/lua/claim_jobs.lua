-- Claim queued arq jobs for this worker, as arq's Worker.start_jobs does per job with
-- WATCH/EXISTS/ZSCORE/MULTI (four round trips), here for all of them in one.
--
-- KEYS: the queue, then the in-progress key of each job id
-- ARGV: now_ms, in_progress_ms, then the job ids
-- Returns per job its queue score, or false when it is running elsewhere, finished,
-- or deferred to later.
local now, ttl = tonumber(ARGV[1]), ARGV[2]
local out = {}
for i = 3, #ARGV do
  local in_progress = KEYS[i - 1]
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= now and redis.call('EXISTS', in_progress) == 0 then
    redis.call('SET', in_progress, '1', 'PX', ttl)
    out[#out + 1] = score
  else
    out[#out + 1] = false
  end
end
return out
