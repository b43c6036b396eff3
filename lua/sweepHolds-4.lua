--[[
  Release every held (not locked) hold of one variant whose expiry time has passed, up to a limit.
  Idempotent: what is released once is gone. Timer keys are not touched (they have lapsed too).

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}  KEYS[4] cust:{v}
  ARGV[1] now_ms   ARGV[2] limit

  Returns: {released holds, released units, earliest expiry left (-1: none), holds left}
]]
--@include holds

local stockKey, holdsKey, expKey, custKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])

local count, units = reclaimLapsed(stockKey, holdsKey, expKey, custKey, now, limit)
return {count, units, earliestExpiry(expKey), redis.call("HLEN", holdsKey)}
