--[[
  Recompute one variant's counters from the database's on_hand and the live holds, in one atomic step,
  so no reserve, release, commit or adjustment can interleave. Repairs drift unless dry_run.
  Fenced by version: the on_hand passed in was read from the database outside this script; it is only
  trusted when Redis has applied exactly the same database changes (version equal, no adjustment
  half-way). A mismatch that has not moved for grace_ms is taken as a crash and repaired anyway.

  KEYS[1] stock:{v}  KEYS[2] holds:{v}  KEYS[3] hexp:{v}  KEYS[4] cust:{v}  KEYS[5] sweep:{<slot>}
  KEYS[6] ht:{v} the variant's timer, armed at its indexed expiry (unless dry_run)
  ARGV[1] on_hand   ARGV[2] db_version   ARGV[3] now_ms   ARGV[4] grace_ms   ARGV[5] dry_run (0|1)

  Returns: {status, available, reserved, expected_available, expected_reserved, earliest_expiry,
            stale_locks}
    status: 0 clean | 1 drift (repaired unless dry run) | 2 counters missing (the caller rebuilds them)
            -1 skipped: versions differ (in flight)   -2 skipped: adjustment in flight
            -3 skipped: stale locks to resolve first (finalize or unlock them, then call again)
    stale_locks: flat list {hold_id, gen, token, qty, user, ...} of holds locked longer than grace_ms
]]
--@include holds

local stockKey, holdsKey, expKey, custKey, indexKey, timerKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local onHand, dbVersion, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local grace, dryRun = tonumber(ARGV[4]), ARGV[5] == "1"

local reserved, stale = 0, {}
local all = redis.call("HGETALL", holdsKey)
for i = 1, #all, 2 do
  local h = unpackHold(all[i + 1])
  if h then
    reserved = reserved + h.qty
    if h.state == "l" and now - h.lockms >= grace then
      for _, v in ipairs({all[i], h.gen, h.token, tostring(h.qty), h.user}) do stale[#stale + 1] = v end
    end
  end
end
local expectedAvailable = onHand - reserved
if expectedAvailable < 0 then expectedAvailable = 0 end
local earliest = earliestExpiry(expKey)
if earliest >= 0 and not dryRun then
  -- the sweep index is a hint the reconciler keeps complete: a variant with holds is always in it
  local vid = string.match(stockKey, "{v(%d+)}")
  redis.call("ZADD", indexKey, "LT", earliest, vid)
  local score = tonumber(redis.call("ZSCORE", indexKey, vid))
  if redis.call("EXISTS", stockKey) == 1 then
    redis.call("HSET", stockKey, "idx_exp", score)
  end
  redis.call("SET", timerKey, "1", "PX", math.max(score - now, 10))
end
if #stale > 0 then
  return {-3, counter(stockKey, "available"), counter(stockKey, "reserved"), expectedAvailable, reserved,
          earliest, stale}
end

if redis.call("EXISTS", stockKey) == 0 then
  -- missing counters are built by initStock (which also rebuilds customer counts): the caller runs it
  return {2, -1, -1, expectedAvailable, reserved, earliest, stale}
end

local available = counter(stockKey, "available")
local actualReserved = counter(stockKey, "reserved")
local version = counter(stockKey, "version")
local pending = counter(stockKey, "adj_pending")
local force = false

if pending > 0 then
  if now - counter(stockKey, "adj_since") < grace then
    return {-2, available, actualReserved, expectedAvailable, reserved, earliest, stale}
  end
  force = true
end
if version ~= dbVersion and not force then
  -- remember when this mismatch was first seen; repair only once it has stood still for grace_ms
  if counter(stockKey, "mm_version") == dbVersion and counter(stockKey, "mm_local") == version
     and now - counter(stockKey, "mm_since") >= grace then
    force = true
  else
    if not dryRun and not (counter(stockKey, "mm_version") == dbVersion and counter(stockKey, "mm_local") == version) then
      redis.call("HSET", stockKey, "mm_version", dbVersion, "mm_local", version, "mm_since", now)
    end
    return {-1, available, actualReserved, expectedAvailable, reserved, earliest, stale}
  end
end

local drift = available ~= expectedAvailable or actualReserved ~= reserved or version ~= dbVersion
if not dryRun then
  if drift or force then
    redis.call("HSET", stockKey, "available", expectedAvailable, "reserved", reserved, "version", dbVersion)
  end
  if force then redis.call("HSET", stockKey, "adj_pending", 0) end
  redis.call("HDEL", stockKey, "mm_version", "mm_local", "mm_since")
end
if drift then
  return {1, available, actualReserved, expectedAvailable, reserved, earliest, stale}
end
return {0, available, actualReserved, expectedAvailable, reserved, earliest, stale}
