-- Version-guarded cache writes, atomic on the server.
--
-- KEYS[1..n]: value keys, all distinct; KEYS[n+1..2n]: their version keys. A version key
--   shares its value key's hash slot, so a call stays on one Redis Cluster node when its
--   entries share a slot. Writes to one key that must apply in order go in successive calls.
-- ARGV[1]: tombstone TTL in milliseconds ("0" keeps tombstones forever).
-- ARGV[2]: one character per entry: "u" upsert, "t" upsert with a TTL, "d" delete.
-- ARGV[3..n+2]: versions (decimal, no leading zeros).
-- ARGV[n+3..2n+2]: values ("" for deletes).
-- ARGV[2n+3..]: TTLs in milliseconds, one per "t" entry, in order.
-- Returns one character per entry: A applied, S stale (older), D duplicate (same version).
--
-- A version key holds "<version>" for a live entry and "<version>:deleted" for a tombstone.
-- Versions compare by length, then byte by byte: exact for the whole u64 range.
local n = #KEYS / 2
local tombstone_ttl = tonumber(ARGV[1])
local ops = ARGV[2]
local stored = redis.call('MGET', unpack(KEYS, n + 1, 2 * n))

local out = {}
local mset = {}
local m = 0
local deletes = {}
local ttl_index = 2 * n + 2
for i = 1, n do
  local op = string.byte(ops, i)
  if op == 116 then ttl_index = ttl_index + 1 end  -- 't'
  local cur = stored[i]
  if cur and string.byte(cur, -1) == 100 then  -- a tombstone ends in "deleted"
    cur = string.sub(cur, 1, string.find(cur, ':', 1, true) - 1)
  end
  local v = ARGV[2 + i]
  if cur and (#v < #cur or (#v == #cur and v <= cur)) then
    out[i] = (v == cur) and 'D' or 'S'
  else
    out[i] = 'A'
    local key, vk = KEYS[i], KEYS[n + i]
    if op == 117 then  -- 'u': plain upserts share one MSET
      mset[m + 1] = key
      mset[m + 2] = ARGV[n + 2 + i]
      mset[m + 3] = vk
      mset[m + 4] = v
      m = m + 4
    elseif op == 116 then
      local ttl = tonumber(ARGV[ttl_index])
      redis.call('SET', key, ARGV[n + 2 + i], 'PX', ttl)
      -- The version outlives an expiring value by the tombstone TTL, so a late older
      -- message cannot bring back data older than what just expired.
      if tombstone_ttl == 0 then
        redis.call('SET', vk, v)
      else
        redis.call('SET', vk, v, 'PX', math.max(ttl, tombstone_ttl))
      end
    else
      deletes[#deletes + 1] = key
      if tombstone_ttl == 0 then
        redis.call('SET', vk, v .. ':deleted')
      else
        redis.call('SET', vk, v .. ':deleted', 'PX', tombstone_ttl)
      end
    end
  end
end
if m > 0 then redis.call('MSET', unpack(mset)) end
if #deletes > 0 then redis.call('DEL', unpack(deletes)) end
return table.concat(out)
