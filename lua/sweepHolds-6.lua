--[[
  Release every held (not locked) hold of one variant whose expiry time has passed, up to a limit,
  and set the variant's entry in its slot's sweep index to its next expiry (or remove it).
  Idempotent: what is released once is gone. The variant's timer is armed for that next expiry,
  relative to now (so a Redis clock a little ahead cannot make it lapse unseen; at least 10 ms, as a
  timer that lapses at once raises no event), or deleted when no hold is left.

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}  KEYS[4] cust:{v}  KEYS[5] sweep:{<slot>}
  KEYS[6] ht:{v} the variant's timer
  ARGV[1] now_ms   ARGV[2] limit   ARGV[3] variant id   ARGV[4] revisit_ms (for holds locked past expiry)

  Returns: {released holds, released units, earliest expiry left (-1: none), holds left}
]]
--@include holds

local stockKey, holdsKey, expKey, custKey, indexKey, timerKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now, limit, variantId, revisit = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])

local count, units = reclaimLapsed(stockKey, holdsKey, expKey, custKey, now, limit)
local earliest = earliestExpiry(expKey)
local score = earliest
if earliest < 0 then
  redis.call("ZREM", indexKey, variantId)
elseif count >= limit then
  score = now  -- more are due: the caller comes back
elseif earliest <= now then
  score = now + revisit  -- only holds locked for checkout are past due: look again later
end
if score >= 0 then
  redis.call("ZADD", indexKey, score, variantId)
  redis.call("SET", timerKey, "1", "PX", math.max(score - now, 10))
else
  redis.call("DEL", timerKey)
end
-- the reserve script reads the indexed score beside the counters (idx_exp)
if redis.call("EXISTS", stockKey) == 1 then
  if score >= 0 then redis.call("HSET", stockKey, "idx_exp", score) else redis.call("HDEL", stockKey, "idx_exp") end
end
return {count, units, earliest, redis.call("HLEN", holdsKey)}
