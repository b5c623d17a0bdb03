-- A model's circuit breaker and global per-minute limits, shared by every replica.
--
-- mode 'check' (at admission): may the model be tried? Closed: yes. Open: no, until the
-- cool-down ends; then half-open: exactly one request at a time becomes the probe. The
-- model's limits are checked but not consumed (batch requests may use only their share).
-- mode 'release': the request holding the probe was refused before it could try the model;
-- another request may probe now.
-- mode 'record' (at settlement): one attempt's outcome. It consumes the model's limits,
-- and failures open the breaker (N in a row, or a failure ratio over a window); a failed
-- probe reopens it with a doubled cool-down, a successful probe closes it.
--
-- KEYS  1 breaker (hash)  2 model policy (hash)  3 requests TAT  4 tokens TAT
-- ARGV  1 mode  2 batch (0/1)  3 batch share  4 tokens  5 success (1/0)
--       6 failures in a row to open  7 failure ratio to open  8 ratio window (s)
--       9 minimum requests in the window  10 cool-down (s)  11 longest cool-down (s)
--       12 probe lifetime (s)
-- Returns for 'check': {1} try it, {2} try it as the probe, {0, why, retry_after_us} skip it;
--         for 'record': {state}.

local WINDOW = 60000000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function num(v) return tonumber(v) or 0 end
local function us(v) return string.format('%.0f', v) end
local breaker = KEYS[1]
local b = redis.call('HMGET', breaker, 'state', 'open_until', 'probe_until', 'cooldown',
  'consecutive', 'w_start', 'w_total', 'w_fail')
local state = b[1] or 'closed'
local policy = redis.call('HMGET', KEYS[2], 'rpm', 'tpm')
local limits = {{KEYS[3], num(policy[1]), 1}, {KEYS[4], num(policy[2]), tonumber(ARGV[4])}}

if ARGV[1] == 'check' then
  local answer = 1
  if state == 'open' then
    local open_until = num(b[2])
    if now < open_until then
      return {0, 'breaker_open', open_until - now}
    end
    state = 'half_open'
    redis.call('HSET', breaker, 'state', state)
  end
  if state == 'half_open' then
    local probe_until = num(b[3])
    if probe_until > now then
      return {0, 'breaker_open', probe_until - now}
    end
    redis.call('HSET', breaker, 'probe_until', us(now + tonumber(ARGV[12]) * 1000000))
    answer = 2
  end
  local share = ARGV[2] == '1' and tonumber(ARGV[3]) or 1
  for _, limit in ipairs(limits) do
    local per_minute = limit[2]
    if per_minute > 0 then
      local tat = tonumber(redis.call('GET', limit[1]))
      if not tat or tat < now then tat = now end
      local allowed = tat + WINDOW / per_minute * limit[3] - WINDOW * share
      if allowed > now then
        if answer == 2 then redis.call('HSET', breaker, 'probe_until', 0) end
        return {0, 'model_rate_limited', math.ceil(allowed - now)}
      end
    end
  end
  return {answer}
end

if ARGV[1] == 'release' then
  if state == 'half_open' then redis.call('HSET', breaker, 'probe_until', 0) end
  return {state}
end

-- 'record': consume the model's limits, then move the breaker.
for _, limit in ipairs(limits) do
  local per_minute = limit[2]
  if per_minute > 0 and limit[3] > 0 then
    local tat = tonumber(redis.call('GET', limit[1]))
    if not tat or tat < now then tat = now end
    tat = tat + WINDOW / per_minute * limit[3]
    redis.call('SET', limit[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end

local success = ARGV[5] == '1'
local window = tonumber(ARGV[8]) * 1000000
local w_start, w_total, w_fail = num(b[6]), num(b[7]), num(b[8])
if now - w_start > window then
  w_start, w_total, w_fail = now, 0, 0
end
w_total = w_total + 1
local consecutive = num(b[5])
local cooldown = num(b[4])
local base, longest = tonumber(ARGV[10]), tonumber(ARGV[11])
local open = false
if success then
  consecutive = 0
  if state == 'half_open' then
    state, cooldown = 'closed', 0
    w_start, w_total, w_fail = now, 0, 0
    redis.call('HDEL', breaker, 'open_until', 'probe_until')
  end
else
  consecutive = consecutive + 1
  w_fail = w_fail + 1
  if state == 'half_open' then
    open, cooldown = true, math.min(math.max(cooldown * 2, base), longest)
  elseif state == 'closed' and (consecutive >= tonumber(ARGV[6])
      or (w_total >= tonumber(ARGV[9]) and w_fail / w_total >= tonumber(ARGV[7]))) then
    open, cooldown = true, base
  end
end
if open then
  state = 'open'
  redis.call('HSET', breaker, 'open_until', us(now + cooldown * 1000000), 'probe_until', 0)
end
redis.call('HSET', breaker, 'state', state, 'cooldown', cooldown, 'consecutive', consecutive,
  'w_start', us(w_start), 'w_total', w_total, 'w_fail', w_fail)
redis.call('EXPIRE', breaker, 86400)
return {state}
