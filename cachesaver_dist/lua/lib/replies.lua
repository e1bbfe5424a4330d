-- Shared by reserve.lua (put in place of its `-- #include replies` line): reply messages
-- as protocol.encode_replies writes them, msgpack built by hand (Redis's cmsgpack has no
-- binary type): {v = 1, replies = [{id, start, flags, samples = [bin, ...]}, ...]}.
local function mp_len(n, small, tiny, short, long)
  if tiny and n < tiny then return string.char(small + n) end
  if short and n < 256 then return short .. string.char(n) end
  if n < 65536 then return long[1] .. struct.pack('>I2', n) end
  return long[2] .. struct.pack('>I4', n)
end
local STR, BIN, ARR = {'\218', '\219'}, {'\197', '\198'}, {'\220', '\221'}
local function mp_str(s) return mp_len(#s, 160, 32, '\217', STR) .. s end
local function mp_bin(s) return mp_len(#s, 0, nil, '\196', BIN) .. s end
local function mp_uint(n)
  if n < 128 then return string.char(n) end
  if n < 4294967296 then return mp_len(n, 0, nil, '\204', {'\205', '\206'}) end
  return '\207' .. struct.pack('>I4', math.floor(n / 4294967296)) ..
    struct.pack('>I4', n % 4294967296)
end
local K_ID, K_START, K_FLAGS, K_SAMPLES = mp_str('id'), mp_str('start'), mp_str('flags'),
  mp_str('samples')
-- One reply, to be put in a message: request id, first index, flags, raw samples.
local function mp_reply(id, start, flags, samples)
  local parts = {'\132', K_ID, mp_str(id), K_START, mp_uint(start), K_FLAGS, mp_str(flags),
    K_SAMPLES, mp_len(#samples, 144, 16, nil, ARR)}
  for _, sample in ipairs(samples) do parts[#parts + 1] = mp_bin(sample) end
  return table.concat(parts)
end
-- The message of several replies built by mp_reply.
local function mp_message(replies)
  return '\130' .. mp_str('v') .. '\1' .. mp_str('replies') ..
    mp_len(#replies, 144, 16, nil, ARR) .. table.concat(replies)
end
