--[[
  Remove cart lines, each only if it still belongs to the given hold generation: a line that a new
  add wrote meanwhile (a new hold under the same item id) is left alone. Used after checkout, by
  the checkout itself and by the reconciler when it completes a crashed one.

  KEYS[1] cart:{u}
  ARGV[1] item id   ARGV[2] its gen   (ARGV[3], ARGV[4]: the next pair, and so on)

  Returns: the number of lines removed
]]

local cartKey = KEYS[1]
local removed = 0
for i = 1, #ARGV, 2 do
  local raw = redis.call("HGET", cartKey, ARGV[i])
  if raw then
    -- a line is qty|unit_price|expires_ms|gen|tier (app/services/cart.py, Line.dumps)
    if string.match(raw, "^[^|]*|[^|]*|[^|]*|([^|]*)") == ARGV[i + 1] then
      redis.call("HDEL", cartKey, ARGV[i])
      removed = removed + 1
    end
  end
end
return removed
