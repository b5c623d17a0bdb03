-- Undoes a reservation that no model can use: the request never ran, so nothing is
-- charged or counted and no settlement marker is written (the client may retry it).
--
-- KEYS  1 pending  2 reservations  3 reserved  4 key tokens TAT  5 tenant tokens TAT
--       6 key requests TAT  7 tenant requests TAT  8 policy
-- ARGV  1 request id
-- Returns {1} released, {0} nothing held.

local rid = ARGV[1]
local held = redis.call('HGET', KEYS[2], rid)
if not held then
  return {0}
end
local key_id, team, tokens, cost = parse_reservation(held)
redis.call('HDEL', KEYS[2], rid)
redis.call('ZREM', KEYS[1], rid)
for _, holder in ipairs({'tenant', 'team:' .. team, 'key:' .. key_id}) do
  if holder ~= 'team:' then redis.call('HINCRBY', KEYS[3], holder, 0 - cost) end
end
-- Give back what the admission took from the per-minute limits.
local limits = redis.call('HMGET', KEYS[8], 'key:' .. key_id .. ':tpm', 'tenant:tpm',
  'key:' .. key_id .. ':rpm', 'tenant:rpm')
local taken = {{KEYS[4], limits[1], tokens}, {KEYS[5], limits[2], tokens},
  {KEYS[6], limits[3], 1}, {KEYS[7], limits[4], 1}}
for _, t in ipairs(taken) do
  local per_minute = num(t[2])
  local tat = tonumber(redis.call('GET', t[1]))
  if per_minute > 0 and tat then
    tat = tat - t[3] * 60000000 / per_minute
    if tat <= now then
      redis.call('DEL', t[1])
    else
      redis.call('SET', t[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
    end
  end
end
return {1}
