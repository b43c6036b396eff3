--[[
  Mark cart lines whose hold was lost (a failover dropped it) as lapsed, each only if the line is
  still exactly as the reconciler read it: a line rewritten or removed meanwhile is left alone.
  The reconciler reports the lines this script marked, so each lost hold is reported once.

  KEYS[1] cart:{u}
  ARGV[1] item id   ARGV[2] the line as read   ARGV[3] the line to write (expiry 0)
  (ARGV[4..6]: the next line, and so on)

  Returns: the item ids marked
]]

local cartKey = KEYS[1]
local marked = {}
for i = 1, #ARGV, 3 do
  if redis.call("HGET", cartKey, ARGV[i]) == ARGV[i + 1] then
    redis.call("HSET", cartKey, ARGV[i], ARGV[i + 2])
    marked[#marked + 1] = ARGV[i]
  end
end
return marked
