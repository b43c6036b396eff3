--[[
  Rebuild a variant's counters from the database's on_hand and the live holds, if they are missing.
  Atomic and idempotent: counters that exist are never touched, so two processes racing to rebuild
  agree, and a missing counter is never read as zero or unlimited.

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}  KEYS[4] cust:{v}
  ARGV[1] on_hand   ARGV[2] version (the database's)
  ARGV[3] per-customer limit (0 = none)   ARGV[4..] user, units ordered, user, units ordered, ...
    (from the database's order lines; with a limit, each customer's count is rebuilt as those
    units plus what the live holds of that customer hold)

  Returns: {1, available, reserved} built | {0, available, reserved} already there
]]
--@include holds

local stockKey, holdsKey, custKey = KEYS[1], KEYS[2], KEYS[4]
local onHand, version, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3] or "0")

if redis.call("EXISTS", stockKey) == 1 then
  return {0, counter(stockKey, "available"), counter(stockKey, "reserved")}
end
local reserved = 0
local held = {}
local all = redis.call("HGETALL", holdsKey)
for i = 2, #all, 2 do
  local h = unpackHold(all[i])
  if h then
    reserved = reserved + h.qty
    held[h.user] = (held[h.user] or 0) + h.qty
  end
end
if limit > 0 then
  redis.call("DEL", custKey)
  for i = 4, #ARGV, 2 do
    held[ARGV[i]] = (held[ARGV[i]] or 0) + tonumber(ARGV[i + 1])
  end
  for user, units in pairs(held) do
    if units > 0 then redis.call("HSET", custKey, user, units) end
  end
end
local available = onHand - reserved
if available < 0 then available = 0 end
redis.call("HSET", stockKey, "available", available, "reserved", reserved, "version", version, "adj_pending", 0)
return {1, available, reserved}
