-- Shared by reserve.lua, fork.lua and import_run.lua (put in place of their
-- `-- #include ttl` line): a time to live in ms, checked before the script writes
-- anything (a PEXPIRE refused after the writes would leave them without their expiry).
-- A whole number of at most 14 digits (about 3,000 years): now + ttl fits Redis's clock,
-- and Lua still writes it as digits.
local function ttl_ms(value, what, least)
  if not string.match(value, '^%d+$') or #value > 14 or tonumber(value) < least then
    error({err = 'ERR ' .. what .. ' must be a whole number of ms from ' .. least ..
      ' to 14 digits, got ' .. string.sub(value, 1, 40) .. ': nothing was written'})
  end
  return tonumber(value)
end
