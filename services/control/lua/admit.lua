-- Admits one request against a key's per-minute limits (GCRA), atomically.
-- Idempotent: a request that already holds a reservation is admitted again, unchanged.
--
-- KEYS[1] request limit state (theoretical arrival time, microseconds)
-- KEYS[2] token limit state (theoretical arrival time, microseconds)
-- KEYS[3] the request's reservation (hash)
-- ARGV[1] microseconds per request (0: no request limit)
-- ARGV[2] microseconds per token (0: no token limit)
-- ARGV[3] burst window, microseconds: how much of the rate may be used at once
-- ARGV[4] tokens to reserve
-- ARGV[5] reservation lifetime, seconds
-- ARGV[6] key id, recorded in the reservation
--
-- Returns {1, reserved_tokens, replayed} when admitted,
--         {0, retry_after_us, limit_name} when refused.
local reservation = KEYS[3]
local held = redis.call('HGET', reservation, 'tokens')
if held then
  return {1, tonumber(held), 1}
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local window = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])

local function next_tat(key, interval, quantity)
  local tat = tonumber(redis.call('GET', key))
  if not tat or tat < now then
    tat = now
  end
  return tat + interval * quantity
end

local function store(key, tat)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end

local per_request = tonumber(ARGV[1])
local per_token = tonumber(ARGV[2])
local request_tat, token_tat
if per_request > 0 then
  request_tat = next_tat(KEYS[1], per_request, 1)
  if request_tat - window > now then
    return {0, math.ceil(request_tat - window - now), 'requests_per_minute'}
  end
end
if per_token > 0 then
  token_tat = next_tat(KEYS[2], per_token, tokens)
  if token_tat - window > now then
    return {0, math.ceil(token_tat - window - now), 'tokens_per_minute'}
  end
end
if request_tat then store(KEYS[1], request_tat) end
if token_tat then store(KEYS[2], token_tat) end
redis.call('HSET', reservation, 'tokens', tokens, 'key_id', ARGV[6])
redis.call('EXPIRE', reservation, ARGV[5])
return {1, tokens, 0}
