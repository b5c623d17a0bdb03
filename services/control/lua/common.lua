-- Shared prelude (prepended to the scripts that need it): Redis server time and the
-- current UTC day and month, checked against the periods the caller named its keys after.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local day = math.floor(tonumber(t[1]) / 86400)

-- UTC year*100+month of a day number (Howard Hinnant's civil_from_days).
local function month_of(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return y * 100 + m
end

local month = month_of(day)
local function stale_periods(day_arg, month_arg)
  return tostring(day) ~= day_arg or tostring(month) ~= month_arg
end
local function num(v) return tonumber(v) or 0 end
-- (Lua prints -0 for the negation of 0, which Redis refuses as an integer: subtract from 0.)

-- Adds to the usage hashes of each holder (tenant, team, key) for each period (total, day,
-- month). KEYS[first .. first+8] are those hashes in that order; a holder named 'team:'
-- (no team) is skipped. `counts` maps field -> increment; the tenant's hashes also get
-- per-model fields.
local USAGE_TTL = {34560000, 3456000, 34560000}  -- total and month: 400 days; day: 40 days
local function add_usage(first, holders, counts, model)
  for h, holder in ipairs(holders) do
    if holder ~= 'team:' then
      for period = 1, 3 do
        local key = KEYS[first + (h - 1) * 3 + period - 1]
        for field, amount in pairs(counts) do
          if amount ~= 0 then
            redis.call('HINCRBY', key, field, amount)
            if h == 1 and model ~= '' then
              redis.call('HINCRBY', key, 'model:' .. model .. ':' .. field, amount)
            end
          end
        end
        redis.call('EXPIRE', key, USAGE_TTL[period])
      end
    end
  end
end

-- A reservation record: key id | team | tokens | cost | model | admission number (records
-- written before admissions were numbered end with the model: they are admission 1).
local function parse_reservation(record)
  local key_id, team, tokens, cost, rest =
    string.match(record, '^([^|]*)|([^|]*)|(%d+)|(%d+)|(.*)$')
  local model, admission = string.match(rest, '^(.*)|(%d+)$')
  if not model then model, admission = rest, 1 end
  return key_id, team, tonumber(tokens), tonumber(cost), model, tonumber(admission)
end

-- The settlement marker of a request id is a hash: 'n' counts its admissions (a request id
-- settled and then admitted again, as a retry after a failure, gets the next number), one
-- field per settled admission, 'r<admission>' once an admit of the request id was given an
-- admission it already held (replayed), and 'counted' once the request was counted (once,
-- however many admissions it took). A marker written as a plain string settled admission 1.
local function settlement_marker(key)
  if redis.call('TYPE', key).ok == 'string' then
    local ttl = redis.call('PTTL', key)
    redis.call('DEL', key)
    redis.call('HSET', key, 'n', 1, '1', 1, 'counted', 1)
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  end
end

-- Where an expired admission's charge is kept (admission 1 under the request id itself).
local function expired_field(rid, admission)
  if admission == 1 then return rid end
  return rid .. '#' .. admission
end
