--[[
  The Redis half of a stock adjustment, in two phases around the database commit (DESIGN.md):
  units leave `available` before the database is told (so a crash can only undersell), and arrive
  after it. `adj_pending` makes the reconciler leave the variant alone while an adjustment is half-way.

  KEYS[1] stock:{v}
  ARGV[1] phase: "begin" | "commit" | "abort"   ARGV[2] delta (signed)   ARGV[3] now_ms

  begin:  if delta < 0 and available < -delta -> {-2, available}; else available += min(delta, 0),
          adj_pending += 1, adj_since = now
  commit: available += max(delta, 0), version += 1, adj_pending -= 1
  abort:  available -= min(delta, 0), adj_pending -= 1

  Returns: {1, available, reserved, version} | {-1} counters missing | {-2, available} below reserved
]]
--@include holds

local stockKey = KEYS[1]
local phase, delta, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

if redis.call("EXISTS", stockKey) == 0 then return {-1} end

local function donePending()
  if counter(stockKey, "adj_pending") > 0 then redis.call("HINCRBY", stockKey, "adj_pending", -1) end
end

if phase == "begin" then
  local available = counter(stockKey, "available")
  if delta < 0 and available < -delta then return {-2, available} end
  if delta < 0 then redis.call("HINCRBY", stockKey, "available", delta) end
  redis.call("HINCRBY", stockKey, "adj_pending", 1)
  redis.call("HSET", stockKey, "adj_since", now)
elseif phase == "commit" then
  if delta > 0 then redis.call("HINCRBY", stockKey, "available", delta) end
  redis.call("HINCRBY", stockKey, "version", 1)
  donePending()
elseif phase == "abort" then
  if delta < 0 then redis.call("HINCRBY", stockKey, "available", -delta) end
  donePending()
else
  return redis.error_reply("unknown phase " .. tostring(phase))
end
return {1, counter(stockKey, "available"), counter(stockKey, "reserved"), counter(stockKey, "version")}
