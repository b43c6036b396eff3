--[[
  Undo a lock when the checkout did not commit: the hold is held again, or released if it lapsed meanwhile.

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}  KEYS[4] cust:{v}
  ARGV[1] hold id   ARGV[2] gen   ARGV[3] now_ms

  Returns: {1} held again | {2} lapsed, released | {0} nothing to do (not locked, or another generation)
]]
--@include holds

local stockKey, holdsKey, expKey, custKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local holdId, gen, now = ARGV[1], ARGV[2], tonumber(ARGV[3])

local h = unpackHold(redis.call("HGET", holdsKey, holdId))
if not h or h.gen ~= gen or h.state ~= "l" then return {0} end
if h.exp <= now then
  dropHold(stockKey, holdsKey, expKey, custKey, holdId, h)
  return {2}
end
h.state, h.token, h.lockms = "h", "", 0
redis.call("HSET", holdsKey, holdId, packHold(h))
return {1}
