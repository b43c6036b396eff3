--[[
  Reserve units of one variant as a hold with a TTL, or change the size of a live hold.
  When stock is short, lapsed holds of the variant are reclaimed first, so stock comes back even
  with no listener or sweeper; on the common path that costs nothing.
  All-or-nothing: every check runs before the first write.

  KEYS[1] stock:{v}   hash available, reserved, version, ...
  KEYS[2] holds:{v}   hash hold id -> packed hold
  KEYS[3] hexp:{v}    zset hold id -> expiry ms
  KEYS[4] cust:{v}    hash user -> units held plus ordered; kept only while a limit is set (ARGV[7] > 0),
                      so it costs no memory without one, and counts from the moment one is set
  KEYS[5] sweep:{<slot>} the sweep index of the variant's hash slot (variant id -> earliest expiry)
  KEYS[6] ht:{v}      the variant's timer (TTL only): it lapses at the variant's earliest hold expiry
                      and so raises the `expired` event the listener sweeps the variant on; armed
                      here only when a hold expires before every other, re-armed by sweepHolds
  ARGV[1] hold id   ARGV[2] qty   ARGV[3] now_ms   ARGV[4] ttl_ms   ARGV[5] user
  ARGV[6] mode: "add" (hold qty += qty) | "set" (hold qty = qty; 0 removes the hold)
               | "sub" (hold qty -= qty, not below 0: undoes an "add" that must not stand)
  ARGV[7] per-customer limit (0 = none)   ARGV[8] gen for a fresh hold

  Returns:
    {1, available_after, hold_qty, exp_ms, gen, earliest}   reserved (hold_qty 0: hold removed);
                           earliest 1: this hold is now the variant's earliest expiry
    {-1}                   counters missing: rebuild from the database, then call again
    {-2, available}        insufficient stock
    {-3, already}          per-customer limit: `already` units held or ordered
    {-4}                   hold is locked by a checkout in progress
  Error reply: a negative quantity, or 0 in mode "add".
]]
--@include holds

local stockKey, holdsKey, expKey, custKey, indexKey, timerKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local holdId, qty, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local user, mode, limit, freshGen = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]

if not qty or qty < 0 or (mode ~= "set" and qty == 0) or math.floor(qty) ~= qty then
  return redis.error_reply("quantity must be a whole number, at least 1 (0 allowed in mode set)")
end
-- idx_exp: the score of this variant in its slot's sweep index, kept beside the counters so the
-- index is written only when a hold expires earlier than every other (rare with one TTL for all)
local counts = redis.call("HMGET", stockKey, "available", "reserved", "idx_exp")
if not counts[1] then return {-1} end
local available, reserved = tonumber(counts[1]), tonumber(counts[2] or "0")
local function reread()
  counts = redis.call("HMGET", stockKey, "available", "reserved", "idx_exp")
  available, reserved = tonumber(counts[1]), tonumber(counts[2] or "0")
end

-- A customer's first add of a variant (the flash-sale case) puts the new hold in place with HSETNX,
-- so no read of a hold that is not there. Only once stock and the limit allow it, so every check
-- still comes before the first write; where a hold already lives under the id, HSETNX writes
-- nothing and that hold is read and handled below.
local exp = now + ttl
local created = false
if mode == "add" and available >= qty then
  local allowed = true
  if limit > 0 then allowed = tonumber(redis.call("HGET", custKey, user) or "0") + qty <= limit end
  if allowed then
    created = redis.call("HSETNX", holdsKey, holdId,
      packHold({qty = qty, exp = exp, state = "h", user = user, gen = freshGen})) == 1
  end
end
local h = nil
if not created then h = unpackHold(redis.call("HGET", holdsKey, holdId)) end
if h and h.state == "l" then return {-4} end
if h and h.exp <= now then
  -- this customer's own hold lapsed and no release ran yet: drop it, start afresh
  dropHold(stockKey, holdsKey, expKey, custKey, holdId, h)
  h = nil
  reread()
end

local current = 0
if h then current = h.qty end
local target = qty
if mode == "add" then target = current + qty end
if mode == "sub" then target = math.max(current - qty, 0) end
local need = target - current

if need > 0 and available < need then
  -- short of stock: give back this variant's lapsed holds first (no listener or sweeper needed)
  if reclaimLapsed(stockKey, holdsKey, expKey, custKey, now, 50) > 0 then reread() end
  if available < need then return {-2, available} end
end
if limit > 0 and need > 0 and not created then  -- a created hold passed this check above
  local already = tonumber(redis.call("HGET", custKey, user) or "0")
  if already + need > limit then return {-3, already} end
end

-- writes
local indexed = tonumber(counts[3] or "")
local earliest = 0
if target > 0 and (not indexed or exp < indexed) then earliest = 1 end
if need ~= 0 then
  available, reserved = available - need, reserved + need
  if earliest == 1 then
    redis.call("HSET", stockKey, "available", available, "reserved", reserved, "idx_exp", exp)
  else
    redis.call("HSET", stockKey, "available", available, "reserved", reserved)
  end
  if limit > 0 then
    local left = redis.call("HINCRBY", custKey, user, need)
    if left <= 0 then redis.call("HDEL", custKey, user) end
  end
elseif earliest == 1 then
  redis.call("HSET", stockKey, "idx_exp", exp)
end
if target == 0 then
  redis.call("HDEL", holdsKey, holdId)
  redis.call("ZREM", expKey, holdId)
  return {1, available, 0, 0, "", 0}
end
local gen = freshGen
if h then gen = h.gen end
if not created then
  redis.call("HSET", holdsKey, holdId, packHold({qty = target, exp = exp, state = "h", user = user, gen = gen}))
end
redis.call("ZADD", expKey, exp, holdId)
if earliest == 1 then
  -- the variant's id is the tag's number: v<id>
  redis.call("ZADD", indexKey, "LT", exp, string.match(stockKey, "{v(%d+)}"))
  -- relative (PX, not PXAT): it lapses after the hold's time by this caller's clock, whatever Redis's says
  redis.call("SET", timerKey, "1", "PX", ttl)
end
return {1, available, target, exp, gen, earliest}
