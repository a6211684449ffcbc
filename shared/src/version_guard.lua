-- Version check of one batch of guarded writes: the first step of the guard's transaction,
-- or, in the inline form (values in ARGV, below), the whole write in one script call.
--
-- The transaction (MULTI ... EXEC, so nothing else runs in between) is:
--   1. this script: compares versions, writes versions, applies deletes;
--   2. native writes of every upsert's value (MSET, SET PX), whatever this script decided:
--      values never pass through Lua, which is what makes the guard fast;
--   3. version_guard_restore.lua: puts back the keys of upserts that must not apply.
-- Before step 2 this script moves such keys aside (RENAME to __vkeep:...), or notes that
-- they did not exist, in a stash list that step 3 reads. A refusal (corrupt version state)
-- moves aside every upsert key, so a refused batch changes nothing.
--
-- KEYS[1..n]: value keys, all distinct, grouped by version bucket.
-- KEYS[n+1..n+b]: the version buckets (hashes: field = value key, value = "<version>").
-- KEYS[n+b+1]: the stash list.
-- ARGV[1]: tombstone TTL in milliseconds ("0" keeps tombstones forever).
-- ARGV[2]: one character per entry: "u" upsert, "t" upsert with a TTL, "d" delete.
-- ARGV[3..b+2]: how many consecutive value keys belong to each bucket.
-- ARGV[b+3..b+n+2]: versions (decimal, no leading zeros).
-- ARGV[b+n+3..]: TTLs in milliseconds, one per "t" entry, in order.
-- ARGV after the TTLs, in the inline form only: the value of every upsert ("u" and "t"), in
-- order. In that form the script is the whole write: it writes the values of the upserts that
-- apply itself, so it needs no transaction, no moving aside and no restore step.
-- Returns one character per entry: A applied, S stale (older), D duplicate (same version);
-- an empty string when every entry applied, the common case.
--
-- Where a version lives: a live entry without expiry has a field in its bucket; a tombstone
-- or an entry with a TTL has a version key (__ver:{K}) that expires, holding "<version>" or
-- "<version>:deleted". A present field is the newest state: a version key is only written
-- together with removing the field. Versions compare by length, then byte by byte: exact
-- for the whole u64 range.

-- One upsert, inline: the call a Redis Cluster makes for most keys (one per hash slot). The
-- same decisions and writes as the general path below, without its tables and passes, which
-- cost more than the write itself for a single entry. ARGV: tombstone TTL, 'u' or 't', 1, the
-- version, for 't' its TTL, then the value.
if #KEYS == 3 and ((#ARGV == 5 and ARGV[2] == 'u') or (#ARGV == 6 and ARGV[2] == 't')) then
  local key, bucket, v = KEYS[1], KEYS[2], ARGV[4]
  local function refused(why)
    return redis.error_reply('ERR version guard refused the batch: ' .. why)
  end
  local cur = redis.pcall('HGET', bucket, key)
  if type(cur) == 'table' then return refused(bucket .. ': ' .. cur.err) end
  local in_field, version_key = cur, nil
  if not cur then
    version_key = tagged('__ver:', key)
    -- MGET, as below: a stray key of another type reads as no state rather than failing.
    local state = redis.call('MGET', version_key)[1]
    if state then
      cur = string.match(state, '^%d+$') or string.match(state, '^(%d+):deleted$')
      if not cur then return refused('malformed version state of ' .. key) end
    end
  end
  if cur and (#v < #cur or (#v == #cur and v <= cur)) then
    if in_field and not string.find(cur, '^%d+$') then
      return refused('malformed version state of ' .. key)
    end
    return (v == cur) and 'D' or 'S'
  end
  if ARGV[2] == 'u' then
    -- The version goes to the bucket, and any version key goes away.
    redis.call('HSET', bucket, key, v)
    if cur and not in_field then redis.call('DEL', version_key) end
    redis.call('SET', key, ARGV[5])
  else
    -- An expiring entry's version lives in its version key, outliving the value by the
    -- tombstone TTL, and any bucket field goes away.
    local ttl, tombstone_ttl = tonumber(ARGV[5]), tonumber(ARGV[1])
    version_key = version_key or tagged('__ver:', key)
    if in_field then redis.call('HDEL', bucket, key) end
    if tombstone_ttl == 0 then
      redis.call('SET', version_key, v)
    else
      redis.call('SET', version_key, v, 'PX', math.max(ttl, tombstone_ttl))
    end
    redis.call('SET', key, ARGV[6], 'PX', ttl)
  end
  return ''
end

local ops = ARGV[2]
local n = #ops
local nb = #KEYS - n - 1
local stash = KEYS[#KEYS]
local tombstone_ttl = tonumber(ARGV[1])
local first_version = nb + 3
local byte, find, match = string.byte, string.find, string.match
local _, expiring = string.gsub(ops, 't', '')
-- Values follow the TTLs in the inline form.
local before_values = first_version + n - 1 + expiring
local inline = #ARGV > before_values

-- tagged(prefix, key) comes from version_guard_common.lua, sent in front of this script.

local moved = {}
local function move_aside(i)
  local key = KEYS[i]
  if redis.call('EXISTS', key) == 1 then
    redis.call('RENAME', key, tagged('__vkeep:', key))
    moved[#moved + 1] = key
    moved[#moved + 1] = 'r'
  else
    moved[#moved + 1] = key
    moved[#moved + 1] = 'd'
  end
end
local function finish_moves()
  if #moved > 0 then redis.call('RPUSH', stash, unpack(moved)) end
end
local function refuse(why)
  -- The inline form writes nothing after a refusal, so there is nothing to move aside.
  if not inline then
    for i = 1, n do
      if byte(ops, i) ~= 100 then move_aside(i) end
    end
    finish_moves()
  end
  return redis.error_reply('ERR version guard refused the batch: ' .. why)
end

-- Read every entry's state: its bucket field, else its version key.
local replies, starts, counts = {}, {}, {}
local first = 1
for b = 1, nb do
  local count = tonumber(ARGV[2 + b])
  local got = redis.pcall('HMGET', KEYS[n + b], unpack(KEYS, first, first + count - 1))
  if got.err then return refuse(KEYS[n + b] .. ': ' .. got.err) end
  replies[b], starts[b], counts[b] = got, first, count
  first = first + count
end
local version_keys, from_key, missing = {}, {}, 0
for b = 1, nb do
  local got, start = replies[b], starts[b]
  for j = 1, counts[b] do
    if not got[j] then
      local i = start + j - 1
      missing = missing + 1
      from_key[missing] = i
      version_keys[missing] = tagged('__ver:', KEYS[i])
    end
  end
end
-- vk[i]: entry i's version key, for entries without a bucket field; key_state[i]: its content.
local vk, key_state = {}, {}
if missing > 0 then
  -- MGET never fails on a wrong type, so a stray key cannot fail the script here.
  local got = redis.call('MGET', unpack(version_keys))
  for j = 1, missing do
    local i = from_key[j]
    vk[i] = version_keys[j]
    key_state[i] = got[j]
  end
end

-- Decide in input order, with no side effect until every entry is known to be sound.
-- out[i] is set only for entries that do not apply; most batches apply everything.
local out, not_applied, keep_out, kept = {}, 0, {}, 0
local set_fields, del_fields = {}, {}
local deletes, stale_version_keys = {}, {}
-- {version key, value, ttl in ms or 0 for none}
local version_writes = {}
local ttl_index = first_version + n - 1
local before_versions = first_version - 1
-- Inline form: values of the upserts that apply, {key, value} pairs for MSET and {key, value,
-- ttl} for each expiring one; upserts counts the upserts seen, to find each one's value.
local mset, expiring_sets, upserts = {}, {}, 0
-- 117 'u': with only plain upserts, no entry needs its op looked up.
local only_plain = not find(ops, '[^u]')
local i = 0
for b = 1, nb do
  local got = replies[b]
  local fields, nfields = {}, 0
  for j = 1, counts[b] do
    i = i + 1
    local op = only_plain and 117 or byte(ops, i)
    local ttl
    -- 116 't', 117 'u', 100 'd'
    if op == 116 then
      ttl_index = ttl_index + 1
      ttl = tonumber(ARGV[ttl_index])
    end
    local in_field = got[j]
    local cur = in_field or key_state[i]
    if cur and not in_field and not find(cur, '^%d+$') then
      -- Only a version key holds a tombstone.
      cur = match(cur, '^(%d+):deleted$')
      if not cur then return refuse('malformed version state of ' .. KEYS[i]) end
    end
    local v = ARGV[before_versions + i]
    if op ~= 100 then upserts = upserts + 1 end
    if cur and (#v < #cur or (#v == #cur and v <= cur)) then
      -- A bucket field is checked only when it would keep the stored entry: a newer write
      -- replaces even a malformed field, so the common path costs no pattern match.
      if in_field and not find(cur, '^%d+$') then
        return refuse('malformed version state of ' .. KEYS[i])
      end
      out[i] = (v == cur) and 'D' or 'S'
      not_applied = not_applied + 1
      if op ~= 100 then
        kept = kept + 1
        keep_out[kept] = i
      end
    elseif op == 117 then
      -- An upsert's version goes to the bucket, and any version key goes away.
      fields[nfields + 1] = KEYS[i]
      fields[nfields + 2] = v
      nfields = nfields + 2
      if key_state[i] then stale_version_keys[#stale_version_keys + 1] = vk[i] end
      if inline then
        mset[#mset + 1] = KEYS[i]
        mset[#mset + 1] = ARGV[before_values + upserts]
      end
    else
      local key = KEYS[i]
      if in_field then
        local f = del_fields[b]
        if not f then f = {}; del_fields[b] = f end
        f[#f + 1] = key
      end
      local name = vk[i] or tagged('__ver:', key)
      if op == 116 then
        -- The version outlives an expiring value by the tombstone TTL, so a late older
        -- message cannot bring back data older than what just expired.
        local keep = (tombstone_ttl == 0) and 0 or math.max(ttl, tombstone_ttl)
        version_writes[#version_writes + 1] = {name, v, keep}
        if inline then
          expiring_sets[#expiring_sets + 1] = {key, ARGV[before_values + upserts], ttl}
        end
      else
        deletes[#deletes + 1] = key
        version_writes[#version_writes + 1] = {name, v .. ':deleted', tombstone_ttl}
      end
    end
  end
  if nfields > 0 then set_fields[b] = fields end
end

if not inline then
  for _, i in ipairs(keep_out) do move_aside(i) end
  finish_moves()
end
for b, f in pairs(set_fields) do redis.call('HSET', KEYS[n + b], unpack(f)) end
for b, f in pairs(del_fields) do redis.call('HDEL', KEYS[n + b], unpack(f)) end
if #stale_version_keys > 0 then redis.call('DEL', unpack(stale_version_keys)) end
if #deletes > 0 then redis.call('DEL', unpack(deletes)) end
for _, w in ipairs(version_writes) do
  if w[3] == 0 then
    redis.call('SET', w[1], w[2])
  else
    redis.call('SET', w[1], w[2], 'PX', w[3])
  end
end
if #mset > 0 then redis.call('MSET', unpack(mset)) end
for _, w in ipairs(expiring_sets) do redis.call('SET', w[1], w[2], 'PX', w[3]) end
-- An empty reply: every entry applied.
if not_applied == 0 then return '' end
for k = 1, n do out[k] = out[k] or 'A' end
return table.concat(out)
