--[[
  Lock a hold for checkout, so neither expiry path releases it while the order is written.
  A hold past its expiry time is dead even if no release ran yet: it is released here and refused.
  Idempotent for the same token.

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}  KEYS[4] cust:{v}
  ARGV[1] hold id   ARGV[2] checkout token   ARGV[3] now_ms

  Returns:
    {1, qty, gen, user}   locked
    {-1}                  no such hold (released, or lost)
    {-2}                  lapsed (and now released)
    {-3}                  locked by another checkout
]]
--@include holds

local stockKey, holdsKey, expKey, custKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local holdId, token, now = ARGV[1], ARGV[2], tonumber(ARGV[3])

local h = unpackHold(redis.call("HGET", holdsKey, holdId))
if not h then return {-1} end
if h.state == "l" then
  if h.token == token then return {1, h.qty, h.gen, h.user} end
  return {-3}
end
if h.exp <= now then
  dropHold(stockKey, holdsKey, expKey, custKey, holdId, h)
  return {-2}
end
h.state, h.token, h.lockms = "l", token, now
redis.call("HSET", holdsKey, holdId, packHold(h))
return {1, h.qty, h.gen, h.user}
