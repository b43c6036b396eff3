--[[
  A bundle's lines of one hash slot (on a single Redis: all of its lines), reserved all or nothing,
  or given back. The `-0` of the file name: the number of KEYS varies, one group per line.

  op "reserve": each line is reserved exactly as reserveHold in mode "add" would reserve it (a new
    hold, or the line's units added to the customer's live hold, which is renewed; a lapsed hold of
    the customer dropped first; the variant's lapsed holds reclaimed when stock is short; the
    per-customer limit; the sweep index, the timer), but every line is checked before the first
    line is written, so a refused line leaves every line as it was. What each line did is written
    to the bundle's journal in the same step, so an "undo" can give back exactly that.
  op "undo": give back what the journal says this bundle reserved, line by line: a hold untouched
    since is restored as it was before the bundle (removed if the bundle made it); a hold changed
    since (the customer's own add or change) gives back only the units the bundle added; a hold
    gone or replaced (another generation) or locked by a checkout is left alone. Idempotent: an
    undone line leaves the journal.

  KEYS[1]   bundle:{<slot>}:<bundle id>  hash: hold id -> "gen|added|target|exp|prev_qty|prev_exp"
            (the journal; it lapses with the holds, ARGV[3] after the reserve)
  then six keys per line, line i (from 1) at KEYS[6i-4] .. KEYS[6i+1], as reserveHold's KEYS[1..6]:
            stock:{v}  holds:{v}  hexp:{v}  cust:{v}  sweep:{<slot>}  ht:{v}
  ARGV[1] op: "reserve" | "undo"   ARGV[2] now_ms   ARGV[3] ttl_ms   ARGV[4] user
  ARGV[5] per-customer limit (0 = none)
  then three per line, line i at ARGV[3i+3] .. ARGV[3i+5]: hold id, qty, gen for a fresh hold
  (qty and gen are not read by "undo")

  Returns ("reserve"):
    {1, then per line: available_after, hold_qty, exp_ms, gen, earliest}   every line reserved;
                           earliest 1: that hold is now its variant's earliest expiry
    {-1, i}                line i's counters missing: rebuild from the database, then call again
    {-2, i, available}     line i: insufficient stock
    {-3, i, already}       line i: per-customer limit, `already` units held or ordered
    {-4, i}                line i: its hold is locked by a checkout in progress
  Returns ("undo"): {units given back, lines undone, lines left alone because locked}
  Error reply: an unknown op, KEYS and ARGV that do not make whole lines, a quantity that is not a
  whole number of at least 1, a variant twice in one call.
]]
--@include holds

local journalKey = KEYS[1]
local op, now, ttl, user, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local n = (#KEYS - 1) / 6
if n < 1 or n ~= math.floor(n) or #ARGV ~= 5 + 3 * n then
  return redis.error_reply("reserveBundle takes 1 + 6 keys and 3 arguments per line after 5")
end

local function lineKeys(i)
  local k = 6 * (i - 1) + 1
  return KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6]
end

-- Write a hold's new expiry into the sweep index when it is now the variant's earliest, as
-- reserveHold does; `idx` is the variant's idx_exp as read. The timer lapses at that expiry.
local function indexIfEarliest(stockKey, indexKey, timerKey, exp, idx)
  if idx and exp >= idx then return 0 end
  redis.call("HSET", stockKey, "idx_exp", exp)
  redis.call("ZADD", indexKey, "LT", exp, string.match(stockKey, "{v(%d+)}"))
  redis.call("SET", timerKey, "1", "PX", math.max(exp - now, 10))
  return 1
end

if op == "undo" then
  local given, undone, locked = 0, 0, 0
  for i = 1, n do
    local stockKey, holdsKey, expKey, custKey, indexKey, timerKey = lineKeys(i)
    local holdId = ARGV[3 * i + 3]
    local raw = redis.call("HGET", journalKey, holdId)
    if raw then
      local gen, added, target, exp, prevQty, prevExp =
        string.match(raw, "^([^|]*)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)$")
      added, target, exp, prevQty, prevExp =
        tonumber(added), tonumber(target), tonumber(exp), tonumber(prevQty), tonumber(prevExp)
      local h = unpackHold(redis.call("HGET", holdsKey, holdId))
      local keep = false
      if h and h.gen == gen and h.state == "l" then
        locked, keep = locked + 1, true  -- a checkout is buying it: its own steps settle it
      elseif h and h.gen == gen then
        local newQty, newExp = h.qty - math.min(added, h.qty), h.exp
        if h.qty == target and h.exp == exp then newQty, newExp = prevQty, prevExp end
        if newQty == 0 or newExp <= now then
          dropHold(stockKey, holdsKey, expKey, custKey, holdId, h)
          given = given + h.qty
        else
          local give = h.qty - newQty
          redis.call("HSET", holdsKey, holdId,
            packHold({qty = newQty, exp = newExp, state = "h", user = h.user, gen = h.gen}))
          redis.call("ZADD", expKey, newExp, holdId)
          if redis.call("HEXISTS", custKey, h.user) == 1 then
            local left = redis.call("HINCRBY", custKey, h.user, -give)
            if left <= 0 then redis.call("HDEL", custKey, h.user) end
          end
          -- as in dropHold: counters that vanished are rebuilt from the holds, not half-written here
          if redis.call("EXISTS", stockKey) == 1 then
            redis.call("HINCRBY", stockKey, "available", give)
            redis.call("HINCRBY", stockKey, "reserved", -give)
            indexIfEarliest(stockKey, indexKey, timerKey, newExp,
              tonumber(redis.call("HGET", stockKey, "idx_exp") or ""))
          end
          given = given + give
        end
        undone = undone + 1
      end
      if not keep then redis.call("HDEL", journalKey, holdId) end
    end
  end
  return {given, undone, locked}
end

if op ~= "reserve" then return redis.error_reply("unknown op " .. tostring(op)) end

-- checks, every line before any is written (only lapsed holds are given back on the way: they
-- are dead already, and reserveHold reclaims them the same way)
local seen = {}
for i = 1, n do
  local stockKey = lineKeys(i)
  local qty = tonumber(ARGV[3 * i + 4])
  if not qty or qty < 1 or math.floor(qty) ~= qty then
    return redis.error_reply("quantity must be a whole number, at least 1")
  end
  if seen[stockKey] then return redis.error_reply("a variant appears twice in one bundle") end
  seen[stockKey] = true
end
for i = 1, n do
  if redis.call("EXISTS", (lineKeys(i))) == 0 then return {-1, i} end
end
local plan = {}
for i = 1, n do
  local stockKey, holdsKey, expKey, custKey = lineKeys(i)
  local holdId, qty = ARGV[3 * i + 3], tonumber(ARGV[3 * i + 4])
  local counts = redis.call("HMGET", stockKey, "available", "reserved", "idx_exp")
  local h = unpackHold(redis.call("HGET", holdsKey, holdId))
  if h and h.state == "l" then return {-4, i} end
  if h and h.exp <= now then
    -- this customer's own hold lapsed and no release ran yet: drop it, start afresh
    dropHold(stockKey, holdsKey, expKey, custKey, holdId, h)
    h = nil
    counts = redis.call("HMGET", stockKey, "available", "reserved", "idx_exp")
  end
  if tonumber(counts[1]) < qty then
    if reclaimLapsed(stockKey, holdsKey, expKey, custKey, now, 50) > 0 then
      counts = redis.call("HMGET", stockKey, "available", "reserved", "idx_exp")
    end
    if tonumber(counts[1]) < qty then return {-2, i, tonumber(counts[1])} end
  end
  if limit > 0 then
    local already = tonumber(redis.call("HGET", custKey, user) or "0")
    if already + qty > limit then return {-3, i, already} end
  end
  plan[i] = {h = h, counts = counts}
end

-- writes
local exp = now + ttl
local out = {1}
for i = 1, n do
  local stockKey, holdsKey, expKey, custKey, indexKey, timerKey = lineKeys(i)
  local holdId, qty, freshGen = ARGV[3 * i + 3], tonumber(ARGV[3 * i + 4]), ARGV[3 * i + 5]
  local h, counts = plan[i].h, plan[i].counts
  local available, reserved = tonumber(counts[1]) - qty, tonumber(counts[2] or "0") + qty
  redis.call("HSET", stockKey, "available", available, "reserved", reserved)
  if limit > 0 then redis.call("HINCRBY", custKey, user, qty) end
  local prevQty, prevExp, gen = 0, 0, freshGen
  if h then prevQty, prevExp, gen = h.qty, h.exp, h.gen end
  local target = prevQty + qty
  redis.call("HSET", holdsKey, holdId, packHold({qty = target, exp = exp, state = "h", user = user, gen = gen}))
  redis.call("ZADD", expKey, exp, holdId)
  local earliest = indexIfEarliest(stockKey, indexKey, timerKey, exp, tonumber(counts[3] or ""))
  redis.call("HSET", journalKey, holdId,
    gen .. "|" .. qty .. "|" .. target .. "|" .. exp .. "|" .. prevQty .. "|" .. prevExp)
  for _, v in ipairs({available, target, exp, gen, earliest}) do out[#out + 1] = v end
end
redis.call("PEXPIRE", journalKey, ttl)
return out
