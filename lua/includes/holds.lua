-- Shared helpers, pulled into each script by the loader (app/engine/scripts.py) at `--@include holds`.
-- A hold record is one field of holds:{v}: "qty|exp_ms|state|user|gen|token|lock_ms"
--   state: "h" held, "l" locked for checkout. gen: random per fresh hold (guards against reuse of a hold id).

local function unpackHold(raw)
  if not raw then return nil end
  local qty, exp, state, user, gen, token, lockms =
    string.match(raw, "^(%d+)|(%d+)|(%a)|([^|]*)|([^|]*)|([^|]*)|(%d*)$")
  if not qty then return nil end
  return {qty = tonumber(qty), exp = tonumber(exp), state = state, user = user, gen = gen,
          token = token, lockms = tonumber(lockms) or 0}
end

local function packHold(h)
  return h.qty .. "|" .. h.exp .. "|" .. h.state .. "|" .. h.user .. "|" .. h.gen .. "|" ..
         (h.token or "") .. "|" .. (h.lockms or 0)
end

-- Counters live in a hash; an absent field is 0 once the hash exists.
local function counter(stockKey, field)
  return tonumber(redis.call("HGET", stockKey, field) or "0") or 0
end

-- Return one hold's units to stock and forget it (counters, index, per-customer count).
-- The caller has checked the hold may be released. The variant's timer is left as it is: if it
-- was armed for this hold, it lapses for nothing and the sweep it triggers re-arms it.
local function dropHold(stockKey, holdsKey, expKey, custKey, holdId, h)
  redis.call("HDEL", holdsKey, holdId)
  redis.call("ZREM", expKey, holdId)
  if redis.call("EXISTS", stockKey) == 1 then
    redis.call("HINCRBY", stockKey, "available", h.qty)
    redis.call("HINCRBY", stockKey, "reserved", -h.qty)
  end
  -- customers are counted only while MAX_UNITS_PER_CUSTOMER is set (see reserveHold)
  if h.user ~= "" and redis.call("HEXISTS", custKey, h.user) == 1 then
    local left = redis.call("HINCRBY", custKey, h.user, -h.qty)
    if left <= 0 then redis.call("HDEL", custKey, h.user) end
  end
end

-- Release up to `limit` held (not locked) holds whose expiry time is <= now.
-- Returns released holds, released units.
local function reclaimLapsed(stockKey, holdsKey, expKey, custKey, now, limit)
  local due = redis.call("ZRANGE", expKey, "-inf", now, "BYSCORE", "LIMIT", 0, limit)
  local count, units = 0, 0
  for _, holdId in ipairs(due) do
    local h = unpackHold(redis.call("HGET", holdsKey, holdId))
    if not h then
      redis.call("ZREM", expKey, holdId)
    elseif h.state == "h" and h.exp <= now then
      dropHold(stockKey, holdsKey, expKey, custKey, holdId, h)
      count = count + 1
      units = units + h.qty
    end
  end
  return count, units
end

local function earliestExpiry(expKey)
  local first = redis.call("ZRANGE", expKey, 0, 0, "WITHSCORES")
  if first[2] then return tonumber(first[2]) end
  return -1
end
