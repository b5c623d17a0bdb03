-- Turns one expired reservation (never settled) into a charge of its worst case: the
-- money is spent, not freed. A settlement that comes later corrects it to the real cost.
--
-- KEYS  1 pending  2 reservations  3 reserved  4 expired (hash rid[#admission] -> cost)
--       5..13 usage hashes of the reservation's tenant, team, key (total, day, month)
--       14 settlement marker of the request id
-- ARGV  1 request id  2 day id  3 month id
-- Returns {1} charged, {0} not expired (or already settled), {-1, day, month} stale periods.

if stale_periods(ARGV[2], ARGV[3]) then
  return {-1, day, month}
end
local rid = ARGV[1]
local expiry = tonumber(redis.call('ZSCORE', KEYS[1], rid))
if not expiry or expiry > now then
  return {0}
end
local held = redis.call('HGET', KEYS[2], rid)
redis.call('ZREM', KEYS[1], rid)
if not held then
  return {0}
end
local key_id, team, _, cost, model, admission = parse_reservation(held)
redis.call('HDEL', KEYS[2], rid)
for _, holder in ipairs({'tenant', 'team:' .. team, 'key:' .. key_id}) do
  if holder ~= 'team:' then redis.call('HINCRBY', KEYS[3], holder, 0 - cost) end
end
redis.call('HSET', KEYS[4], expired_field(rid, admission), cost)
redis.call('EXPIRE', KEYS[4], 604800)
settlement_marker(KEYS[14])
local counted = redis.call('HSETNX', KEYS[14], 'counted', 1)
redis.call('EXPIRE', KEYS[14], 604800)
add_usage(5, {'tenant', 'team:' .. team, 'key:' .. key_id},
  {spent = cost, requests = counted, outcome_expired = 1}, model)
return {1}
