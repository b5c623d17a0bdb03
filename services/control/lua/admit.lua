-- Admits one request of a tenant, atomically: concurrency, per-minute limits of the key
-- and the tenant (GCRA), and every budget of the tenant, its team and the key for the day,
-- the month and all time; then reserves the request's tokens and worst-case cost.
-- Idempotent: a request that already holds a reservation is admitted again, unchanged; a
-- request id admitted after it was settled (a retry) is a new admission with the next number.
-- Batch requests may use only `batch_share` of each limit, so they are refused first.
--
-- KEYS  1 policy  2 pending (zset rid -> expiry us)  3 reservations (hash)  4 reserved (hash)
--       5 key requests TAT  6 key tokens TAT  7 tenant requests TAT  8 tenant tokens TAT
--       9..17 usage hashes: tenant, team, key (each: total, day, month)
--       18 settlement marker of the request id
-- ARGV  1 request id  2 key id  3 team ('' for none)  4 day id  5 month id
--       6 tokens  7 cost (micro-USD)  8 reservation lifetime (s)  9 batch (0/1)
--       10 batch share  11 model
-- Returns {1, tokens, cost, replayed, admission}           admitted
--         {0, reason, detail, retry_after_us, limit, remaining}  refused
--         {-1, day id, month id}                          the caller's periods are stale

local WINDOW = 60000000
if stale_periods(ARGV[4], ARGV[5]) then
  return {-1, day, month}
end

local rid, key_id, team = ARGV[1], ARGV[2], ARGV[3]
local held = redis.call('HGET', KEYS[3], rid)
if held then
  local _, _, tokens, cost, _, admission = parse_reservation(held)
  -- Another call holds the admission now: one whose caller was cut before it saw the
  -- admission leaves its settlement to this one (settle.lua, ARGV 14).
  settlement_marker(KEYS[18])
  redis.call('HSET', KEYS[18], 'r' .. admission, 1)
  return {1, tokens, cost, 1, admission}
end

local tokens, cost = tonumber(ARGV[6]), tonumber(ARGV[7])
local batch = ARGV[9] == '1'
local share = batch and tonumber(ARGV[10]) or 1

local fields = {
  'tenant:rpm', 'tenant:tpm', 'tenant:concurrency', 'tenant:burst_s',
  'key:' .. key_id .. ':rpm', 'key:' .. key_id .. ':tpm',
  'tenant:budget:total', 'tenant:budget:day', 'tenant:budget:month',
  'team:' .. team .. ':budget:total', 'team:' .. team .. ':budget:day',
  'team:' .. team .. ':budget:month',
  'key:' .. key_id .. ':budget:total', 'key:' .. key_id .. ':budget:day',
  'key:' .. key_id .. ':budget:month',
}
local p = redis.call('HMGET', KEYS[1], unpack(fields))

-- Concurrency: requests holding a reservation (expired ones count until swept: safe side).
local concurrency = num(p[3])
if concurrency > 0 and redis.call('ZCARD', KEYS[2]) + 1 > concurrency * share then
  return {0, 'CONCURRENCY_LIMITED', 'tenant', 1000000, concurrency, 0}
end

-- GCRA: a steady rate per minute, with bursts up to `burst_s` seconds of that rate at once
-- (default: a whole minute's allowance).
local burst = (num(p[4]) > 0 and num(p[4]) or 60) * 1000000
local pending_tat = {}
local function gcra(key, per_minute, quantity, scope, name)
  if per_minute <= 0 then return nil end
  if quantity > per_minute then
    -- More than a whole minute's allowance: it could never fit.
    return {0, 'REQUEST_EXCEEDS_LIMIT', scope .. ':' .. name, 0, per_minute, 0}
  end
  local interval = WINDOW / per_minute
  local tat = tonumber(redis.call('GET', key))
  if not tat or tat < now then tat = now end
  local new_tat = tat + interval * quantity
  -- An idle bucket always admits one request, however short the burst window.
  local allowed = new_tat - math.max(burst * share, interval * quantity)
  if allowed > now then
    return {0, 'RATE_LIMITED', scope .. ':' .. name, math.ceil(allowed - now), per_minute, 0}
  end
  pending_tat[#pending_tat + 1] = {key, new_tat}
  return nil
end

local refused = gcra(KEYS[5], num(p[5]), 1, 'key', 'requests_per_minute')
  or gcra(KEYS[6], num(p[6]), tokens, 'key', 'tokens_per_minute')
  or gcra(KEYS[7], num(p[1]), 1, 'tenant', 'requests_per_minute')
  or gcra(KEYS[8], num(p[2]), tokens, 'tenant', 'tokens_per_minute')
if refused then return refused end

-- Budgets: spent in the period + reserved by running requests + this worst case.
local holders = {{'tenant', 9, 7}, {'team:' .. team, 12, 10}, {'key:' .. key_id, 15, 13}}
local periods = {'total', 'day', 'month'}
for _, h in ipairs(holders) do
  local holder, usage_at, budget_at = h[1], h[2], h[3]
  if holder ~= 'team:' then
    local reserved = num(redis.call('HGET', KEYS[4], holder))
    for i, period in ipairs(periods) do
      local limit = num(p[budget_at + i - 1])
      if limit > 0 then
        local spent = num(redis.call('HGET', KEYS[usage_at + i - 1], 'spent'))
        if spent + reserved + cost > limit * share then
          local remaining = math.max(0, limit - spent - reserved)
          return {0, 'BUDGET_EXCEEDED', holder .. ':' .. period, 0, limit, remaining}
        end
      end
    end
  end
end

for _, pt in ipairs(pending_tat) do
  redis.call('SET', pt[1], string.format('%.0f', pt[2]), 'PX', math.ceil((pt[2] - now) / 1000) + 1)
end
local lifetime = tonumber(ARGV[8])
settlement_marker(KEYS[18])
local admission = redis.call('HINCRBY', KEYS[18], 'n', 1)
if redis.call('TTL', KEYS[18]) < lifetime + 172800 then
  redis.call('EXPIRE', KEYS[18], lifetime + 172800)
end
redis.call('ZADD', KEYS[2], string.format('%.0f', now + lifetime * 1000000), rid)
redis.call('HSET', KEYS[3], rid,
  key_id .. '|' .. team .. '|' .. tokens .. '|' .. cost .. '|' .. ARGV[11] .. '|' .. admission)
for _, h in ipairs(holders) do
  if h[1] ~= 'team:' then
    redis.call('HINCRBY', KEYS[4], h[1], cost)
  end
end
-- The structures live while the tenant has traffic (the sweeper empties them meanwhile).
local keep = lifetime + 172800
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], keep) end
return {1, tokens, cost, 0, admission}
