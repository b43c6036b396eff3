--[[
  Rebuild a variant's counters from the database's on_hand and the live holds, if they are missing.
  Atomic and idempotent: counters that exist are never touched, so two processes racing to rebuild
  agree, and a missing counter is never read as zero or unlimited.

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}
  ARGV[1] on_hand   ARGV[2] version (the database's)

  Returns: {1, available, reserved} built | {0, available, reserved} already there
]]
--@include holds

local stockKey, holdsKey = KEYS[1], KEYS[2]
local onHand, version = tonumber(ARGV[1]), tonumber(ARGV[2])

if redis.call("EXISTS", stockKey) == 1 then
  return {0, counter(stockKey, "available"), counter(stockKey, "reserved")}
end
local reserved = 0
local all = redis.call("HGETALL", holdsKey)
for i = 2, #all, 2 do
  local h = unpackHold(all[i])
  if h then reserved = reserved + h.qty end
end
local available = onHand - reserved
if available < 0 then available = 0 end
redis.call("HSET", stockKey, "available", available, "reserved", reserved, "version", version, "adj_pending", 0)
return {1, available, reserved}
