-- Settles one request exactly once: records its usage and returns the unused part of its
-- token reservation to the key's token limit.
--
-- KEYS[1] settled marker of the request
-- KEYS[2] the request's reservation (hash)
-- KEYS[3] token limit state of the key (theoretical arrival time, microseconds)
-- KEYS[4] tenant usage (hash)
-- KEYS[5] key usage (hash)
-- ARGV[1] settled marker lifetime, seconds
-- ARGV[2] input tokens
-- ARGV[3] output tokens
-- ARGV[4] cost, micro-USD
-- ARGV[5] microseconds per token (0: no token limit)
-- ARGV[6] outcome name: success, failure or cancelled
-- ARGV[7] 1 when the answer came from the cache
-- ARGV[8] model alias that answered ('' when none)
--
-- Returns 1 when applied, 0 when the request had been settled before.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end

local input_tokens = tonumber(ARGV[2])
local output_tokens = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local per_token = tonumber(ARGV[5])

local reserved = tonumber(redis.call('HGET', KEYS[2], 'tokens'))
redis.call('DEL', KEYS[2])
if reserved and per_token > 0 then
  local unused = reserved - input_tokens - output_tokens
  local tat = tonumber(redis.call('GET', KEYS[3]))
  if unused ~= 0 and (tat or unused < 0) then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
    if not tat or tat < now then
      tat = now
    end
    tat = tat - unused * per_token
    if tat <= now then
      redis.call('DEL', KEYS[3])
    else
      redis.call('SET', KEYS[3], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
    end
  end
end

local outcome = 'outcome_' .. ARGV[6]
local cached = tonumber(ARGV[7])
for i = 4, 5 do
  redis.call('HINCRBY', KEYS[i], 'requests', 1)
  redis.call('HINCRBY', KEYS[i], 'input_tokens', input_tokens)
  redis.call('HINCRBY', KEYS[i], 'output_tokens', output_tokens)
  redis.call('HINCRBY', KEYS[i], 'cost_usd_micros', cost)
  redis.call('HINCRBY', KEYS[i], outcome, 1)
  redis.call('HINCRBY', KEYS[i], 'cache_hits', cached)
end
if ARGV[8] ~= '' then
  local prefix = 'model:' .. ARGV[8] .. ':'
  redis.call('HINCRBY', KEYS[4], prefix .. 'requests', 1)
  redis.call('HINCRBY', KEYS[4], prefix .. 'input_tokens', input_tokens)
  redis.call('HINCRBY', KEYS[4], prefix .. 'output_tokens', output_tokens)
  redis.call('HINCRBY', KEYS[4], prefix .. 'cost_usd_micros', cost)
end
return 1
