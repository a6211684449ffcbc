-- The last step of the guard's transaction (see version_guard.lua): after the native value
-- writes, puts back each key whose upsert must not apply, exactly as it was (value and TTL),
-- or removes it again if it did not exist.
--
-- KEYS[1]: the stash list of (key, "r" moved aside | "d" did not exist) pairs.
-- Returns how many keys were put back.
-- tagged(prefix, key) comes from version_guard_common.lua, sent in front of this script.

local moved = redis.call('LRANGE', KEYS[1], 0, -1)
if #moved == 0 then return 0 end
redis.call('DEL', KEYS[1])
for i = 1, #moved, 2 do
  local key = moved[i]
  if moved[i + 1] == 'r' then
    redis.call('RENAME', tagged('__vkeep:', key), key)
  else
    redis.call('DEL', key)
  end
end
return #moved / 2
