-- Settles each admission of a request exactly once: replaces its reservation by what it
-- used (spend and tokens for the tenant, its team and the key, in the current day, month
-- and in all), returns unused tokens to the per-minute limits, and frees its concurrency
-- slot. An admission whose reservation already expired into a charge is corrected to its
-- real cost. The request is counted once, however many admissions (retries) it took.
--
-- KEYS  1 settlement marker  2 pending  3 reservations  4 reserved  5 expired (hash)
--       6 policy  7 key tokens TAT  8 tenant tokens TAT
--       9..17 usage hashes: tenant, team, key (each: total, day, month)
-- ARGV  1 request id  2 key id  3 team  4 day id  5 month id  6 input tokens
--       7 output tokens  8 cost  9 outcome  10 cache hit (0/1)  11 model  12 marker lifetime
--       13 admission (0: the one held, else the latest)
--       14 1: its caller was cut before it saw the admission; settle it only if no other
--          call was given it since (an admit of the same request id, replayed)
-- Returns {1} applied, {0} already settled (or left to another call, ARGV 14),
--         {-1, day, month} stale periods,
--         {-2, key id, team} the reservation names another key or team: call again with them.

if stale_periods(ARGV[4], ARGV[5]) then
  return {-1, day, month}
end
local rid, key_id, team = ARGV[1], ARGV[2], ARGV[3]
settlement_marker(KEYS[1])
local admission = tonumber(ARGV[13]) or 0
local held = redis.call('HGET', KEYS[3], rid)
local held_key, held_team, tokens, reserved, held_model, held_admission
if held then
  held_key, held_team, tokens, reserved, held_model, held_admission = parse_reservation(held)
  if admission ~= 0 and admission ~= held_admission then
    -- An earlier admission of the request id, whose reservation is gone.
    held = nil
  elseif held_key ~= key_id or held_team ~= team then
    return {-2, held_key, held_team}
  else
    admission = held_admission
  end
end
if admission == 0 then
  admission = math.max(1, num(redis.call('HGET', KEYS[1], 'n')))
end
if ARGV[14] == '1' and redis.call('HEXISTS', KEYS[1], 'r' .. admission) == 1 then
  return {0}
end
if redis.call('HSETNX', KEYS[1], tostring(admission), 1) == 0 then
  return {0}
end
redis.call('EXPIRE', KEYS[1], ARGV[12])

local input, output, cost = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
-- Outcomes and cache hits count admissions (an expired one was counted when it expired).
local prior, outcomes = 0, 1
local counted = redis.call('HSETNX', KEYS[1], 'counted', 1)

if held then
  redis.call('HDEL', KEYS[3], rid)
  redis.call('ZREM', KEYS[2], rid)
  for _, holder in ipairs({'tenant', 'team:' .. held_team, 'key:' .. held_key}) do
    if holder ~= 'team:' then redis.call('HINCRBY', KEYS[4], holder, 0 - reserved) end
  end
  -- Return the tokens the request did not use to the token limits.
  local unused = tokens - input - output
  local tpm = redis.call('HMGET', KEYS[6], 'key:' .. held_key .. ':tpm', 'tenant:tpm')
  for i, key in ipairs({KEYS[7], KEYS[8]}) do
    local per_minute = num(tpm[i])
    local tat = tonumber(redis.call('GET', key))
    if per_minute > 0 and unused ~= 0 and (tat or unused < 0) then
      if not tat or tat < now then tat = now end
      tat = tat - unused * 60000000 / per_minute
      if tat <= now then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
      end
    end
  end
else
  local field = expired_field(rid, admission)
  local expired = redis.call('HGET', KEYS[5], field)
  if expired then
    -- Already charged its worst case when it expired: correct the charge.
    prior, outcomes = tonumber(expired), 0
    redis.call('HDEL', KEYS[5], field)
  end
end

add_usage(9, {'tenant', 'team:' .. team, 'key:' .. key_id}, {
  spent = cost - prior,
  input_tokens = input,
  output_tokens = output,
  requests = counted,
  ['outcome_' .. ARGV[9]] = outcomes,
  cache_hits = outcomes * tonumber(ARGV[10]),
}, ARGV[11])
return {1}
