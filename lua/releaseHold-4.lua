--[[
  Release one hold: its units go back to `available`. Idempotent: a second call does nothing.

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}  KEYS[4] cust:{v}
  ARGV[1] hold id   ARGV[2] now_ms
  ARGV[3] mode: "expired" (only if its expiry time has passed: listener, sweeper) | "any" (the shopper removes it)
  ARGV[4] gen: only release the hold of this generation ("" = any generation)

  Returns:
    {1, qty}    released
    {0, 0}      nothing to release (already released, or another generation)
    {-1, exp}   not yet lapsed (mode "expired")
    {-2, 0}     locked by a checkout in progress: left alone
]]
--@include holds

local stockKey, holdsKey, expKey, custKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local holdId, now, mode, gen = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

local h = unpackHold(redis.call("HGET", holdsKey, holdId))
if not h then
  redis.call("ZREM", expKey, holdId)
  return {0, 0}
end
-- Another generation lives under this id: its expiry entry is its own, so it stays indexed.
if gen ~= "" and h.gen ~= gen then return {0, 0} end
if h.state == "l" then return {-2, 0} end
if mode == "expired" and h.exp > now then return {-1, h.exp} end
dropHold(stockKey, holdsKey, expKey, custKey, holdId, h)
return {1, h.qty}
