--[[
  Finalize a locked hold after its order is committed in the database: the units leave `reserved`
  for good and the variant's version moves on by one, matching the database's on_hand change.
  Idempotent. If the hold is gone (released after a crash, or Redis lost it) the order still stands:
  when Redis has seen every database change but this one (version == new_version - 1) the units are
  taken from `available`; otherwise the version fence leaves it to the reconciler.

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}  KEYS[4] cust:{v}
  ARGV[1] hold id   ARGV[2] gen   ARGV[3] qty   ARGV[4] new_version (the database's, after the order)
  ARGV[5] user   ARGV[6] per-customer limit (0 = none: customers are not counted)

  Returns: {1} finalized | {2} hold gone, units taken from available | {0} nothing to do
]]
--@include holds

local stockKey, holdsKey, expKey, custKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local holdId, gen, qty, newVersion, user = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local limit = tonumber(ARGV[6] or "0")

local h = unpackHold(redis.call("HGET", holdsKey, holdId))
if h and h.gen == gen then
  redis.call("HDEL", holdsKey, holdId)
  redis.call("ZREM", expKey, holdId)
  if redis.call("EXISTS", stockKey) == 1 then
    redis.call("HINCRBY", stockKey, "reserved", -h.qty)
    redis.call("HINCRBY", stockKey, "version", 1)
  end
  -- the customer's count keeps these units: held became ordered
  return {1}
end
if redis.call("EXISTS", stockKey) == 0 then return {0} end
if counter(stockKey, "version") == newVersion - 1 then
  local available = counter(stockKey, "available")
  local take = qty
  if take > available then take = available end
  redis.call("HINCRBY", stockKey, "available", -take)
  redis.call("HINCRBY", stockKey, "version", 1)
  if user ~= "" and limit > 0 then redis.call("HINCRBY", custKey, user, qty) end
  return {2}
end
return {0}
