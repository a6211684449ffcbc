-- Sent in front of both guard scripts.

-- The name sharing key's cluster slot: prefix + key when key has a hash tag, otherwise
-- prefix + {key}, so the whole key is the tag. Matches version_key() in version_guard.rs.
local function tagged(prefix, key)
  local open = string.find(key, '{', 1, true)
  if open then
    local close = string.find(key, '}', open + 1, true)
    if close and close > open + 1 then return prefix .. key end
  end
  return prefix .. '{' .. key .. '}'
end
