-- Take queued arq jobs named on the wake list, and read them, in one call: the checks
-- of claim_jobs.lua (the claim arq's start_jobs makes per job), then what arq's run_job
-- does first (GET the job, count the try), for every job id at once.
-- Only a job's first try is taken here: a job started before (it has a try counter) or
-- whose body is not a string is left to arq's poll, which runs it with arq's rules.
--
-- KEYS: the queue, then per job its in-progress key, job key and try counter key
-- ARGV: now_ms, in_progress_ms, then the job ids
-- Returns per job its serialized body, or false when it is not taken here.
local now, ttl = tonumber(ARGV[1]), ARGV[2]
local out = {}
for i = 3, #ARGV do
  local at = (i - 3) * 3 + 1
  local in_progress, job, tries = KEYS[at + 1], KEYS[at + 2], KEYS[at + 3]
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  local body = false
  if score and tonumber(score) <= now and redis.call('EXISTS', in_progress, tries) == 0 then
    body = redis.pcall('GET', job)
    if type(body) == 'string' then
      redis.call('SET', in_progress, '1', 'PX', ttl)
      redis.call('SET', tries, '1', 'EX', 88400)
    else
      body = false
    end
  end
  out[#out + 1] = body
end
return out
