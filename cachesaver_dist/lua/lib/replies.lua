-- Shared by reserve.lua (put in place of its `-- #include replies` line): reply messages
-- as protocol.encode_replies writes them, msgpack built by hand (Redis's cmsgpack has no
-- binary type): {v = 1, replies = [{id, start, flags, samples = [bin, ...]}, ...]}.
-- A message is a list of parts, joined once; every header is made once per call.
local function mp_len(n, small, tiny, short, long)
  if tiny and n < tiny then return string.char(small + n) end
  if short and n < 256 then return short .. string.char(n) end
  if n < 65536 then return long[1] .. struct.pack('>I2', n) end
  return long[2] .. struct.pack('>I4', n)
end
local function memo(make)
  return setmetatable({}, {__index = function(t, n)
    local made = make(n)
    t[n] = made
    return made
  end})
end
local STR_HEAD = memo(function(n) return mp_len(n, 160, 32, '\217', {'\218', '\219'}) end)
local BIN_HEAD = memo(function(n) return mp_len(n, 0, nil, '\196', {'\197', '\198'}) end)
local ARRAY_HEAD = memo(function(n) return mp_len(n, 144, 16, nil, {'\220', '\221'}) end)
local UINT = memo(function(n)
  if n < 128 then return string.char(n) end
  if n < 4294967296 then return mp_len(n, 0, nil, '\204', {'\205', '\206'}) end
  return '\207' .. struct.pack('>I4', math.floor(n / 4294967296)) ..
    struct.pack('>I4', n % 4294967296)
end)
local REPLY_ID = '\132' .. STR_HEAD[2] .. 'id'
local START, FLAGS = STR_HEAD[5] .. 'start', STR_HEAD[5] .. 'flags'
local SAMPLES = STR_HEAD[7] .. 'samples'
-- Add one reply to a message's parts: request id, first index, flags, raw samples.
local function mp_reply(parts, id, start, flags, samples)
  local p = #parts
  parts[p + 1], parts[p + 2], parts[p + 3] = REPLY_ID, STR_HEAD[#id], id
  parts[p + 4], parts[p + 5], parts[p + 6] = START, UINT[start], FLAGS
  parts[p + 7], parts[p + 8], parts[p + 9] = STR_HEAD[#flags], flags, SAMPLES
  parts[p + 10] = ARRAY_HEAD[#samples]
  p = p + 10
  for _, sample in ipairs(samples) do
    parts[p + 1], parts[p + 2] = BIN_HEAD[#sample], sample
    p = p + 2
  end
end
-- The message of ``count`` replies whose parts mp_reply added.
local function mp_message(parts, count)
  return '\130' .. STR_HEAD[1] .. 'v' .. '\1' .. STR_HEAD[7] .. 'replies' ..
    ARRAY_HEAD[count] .. table.concat(parts)
end
