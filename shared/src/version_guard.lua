-- Version-guarded cache writes, atomic on the server.
--
-- KEYS: pairs of (value key, version key) per entry; a version key shares its value key's
--       hash slot, so a call stays on one Redis Cluster node when its entries share a slot.
-- ARGV[1]: tombstone TTL in milliseconds ("0" keeps tombstones forever).
-- ARGV per entry i, from 2 + 4*(i-1): op ("u" upsert, "d" delete), version (decimal, no
--       leading zeros), TTL in milliseconds ("0" for none), value ("" for deletes).
-- Returns one character per entry: A applied, S stale (older), D duplicate (same version).
--
-- The version key holds "<version>" for a live entry and "<version>:deleted" for a tombstone.
local tombstone_ttl = tonumber(ARGV[1])
local n = #KEYS / 2

local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

local version_keys = {}
for i = 1, n do version_keys[i] = KEYS[2 * i] end
local stored = redis.call('MGET', unpack(version_keys))

local current = {}   -- version key -> version string, or false when none is stored
local last = {}      -- version key -> index of the newest applied entry in this call
local touched = {}   -- version keys in first-applied order
local out = {}
for i = 1, n do
  local vk = KEYS[2 * i]
  local cur = current[vk]
  if cur == nil then
    cur = (stored[i] and string.match(stored[i], '^%d+')) or false
    current[vk] = cur
  end
  local version = ARGV[2 + 4 * (i - 1) + 1]
  if cur and not newer(version, cur) then
    out[i] = (version == cur) and 'D' or 'S'
  else
    out[i] = 'A'
    current[vk] = version
    if last[vk] == nil then touched[#touched + 1] = vk end
    last[vk] = i
  end
end

local mset = {}
local deletes = {}
for _, vk in ipairs(touched) do
  local i = last[vk]
  local base = 2 + 4 * (i - 1)
  local op, version, ttl = ARGV[base], ARGV[base + 1], tonumber(ARGV[base + 2])
  local key = KEYS[2 * i - 1]
  if op == 'u' then
    if ttl == 0 then
      mset[#mset + 1] = key
      mset[#mset + 1] = ARGV[base + 3]
      mset[#mset + 1] = vk
      mset[#mset + 1] = version
    else
      redis.call('SET', key, ARGV[base + 3], 'PX', ttl)
      -- The version outlives an expiring value by the tombstone TTL, so a late older
      -- message cannot bring back data older than what just expired.
      if tombstone_ttl == 0 then
        redis.call('SET', vk, version)
      else
        redis.call('SET', vk, version, 'PX', math.max(ttl, tombstone_ttl))
      end
    end
  else
    deletes[#deletes + 1] = key
    if tombstone_ttl == 0 then
      redis.call('SET', vk, version .. ':deleted')
    else
      redis.call('SET', vk, version .. ':deleted', 'PX', tombstone_ttl)
    end
  end
end
if #mset > 0 then redis.call('MSET', unpack(mset)) end
if #deletes > 0 then redis.call('DEL', unpack(deletes)) end
return table.concat(out)
