--- Schedules for deployments: standard 5-field cron and fixed intervals.
--
--   "*/5 * * * *"          minute hour day-of-month month day-of-week
--                          (*, lists a,b, ranges a-b, steps */n a-b/n a/n,
--                          names JAN-DEC and SUN-SAT, day-of-week 0 or 7 =
--                          Sunday)
--   "@hourly" "@daily" "@midnight" "@weekly" "@monthly" "@yearly"
--                          the usual cron aliases
--   "@every 30s" "@every 5m" "@every 1h30m"
--                          a fixed interval (units s m h d), fired at the
--                          multiples of the interval since the epoch, so
--                          every process computes the same fire times
--
-- As in cron, when both day-of-month and day-of-week are restricted (do not
-- start with *), a day matches if either matches; otherwise both must.
-- Fire times are computed in local time (os.date / os.time).
--
--   cron.parse(s)            -> schedule, or nil, message naming the bad field
--                               (at most MAX_LENGTH bytes; @every at most
--                               MAX_INTERVAL seconds)
--   schedule:next(after)     -> the first fire time strictly after `after`
--                               (seconds since the epoch), or nil if none
--                               within the next 8 years (e.g. "0 0 30 2 *")
local M = {}

local Schedule = {}
Schedule.__index = Schedule

local FIELDS = {
  { name = "minute", min = 0, max = 59 },
  { name = "hour", min = 0, max = 23 },
  { name = "day-of-month", min = 1, max = 31 },
  { name = "month", min = 1, max = 12,
    names = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6, jul = 7, aug = 8, sep = 9,
      oct = 10, nov = 11, dec = 12 } },
  { name = "day-of-week", min = 0, max = 7,
    names = { sun = 0, mon = 1, tue = 2, wed = 3, thu = 4, fri = 5, sat = 6 } },
}

local ALIASES = {
  ["@yearly"] = "0 0 1 1 *", ["@annually"] = "0 0 1 1 *", ["@monthly"] = "0 0 1 * *",
  ["@weekly"] = "0 0 * * 0", ["@daily"] = "0 0 * * *", ["@midnight"] = "0 0 * * *",
  ["@hourly"] = "0 * * * *",
}

local UNITS = { s = 1, m = 60, h = 3600, d = 86400 }

-- The daemon parses every deployed schedule once a second: a schedule is
-- short text, and a longer one is refused before any pattern sees it.
M.MAX_LENGTH = 1024
-- Ten years: longer intervals are mistakes, and any count of units
-- below it stays far from integer overflow.
M.MAX_INTERVAL = 3650 * 86400

local function value(f, text)
  local n = tonumber(text:match("^%d+$") or "")
  if not n and f.names then n = f.names[text:lower()] end
  return n and math.tointeger(n)
end

-- One field ("1,5-10/2,*/15") -> set {[v] = true}, or nil, message.
local function parse_field(f, text)
  local set = {}
  local function bad(why) return nil, "bad " .. f.name .. " field '" .. text .. "': " .. why end
  for part in (text .. ","):gmatch("([^,]*),") do
    if part == "" then return bad("empty list item") end
    local range, step = part:match("^([^/]+)/(.*)$")
    range = range or part
    local lo, hi
    if range == "*" then
      lo, hi = f.min, f.max
      if f.name == "day-of-week" then hi = 6 end
    else
      local a, b = range:match("^([^%-]+)%-([^%-]+)$")
      if a then
        lo, hi = value(f, a), value(f, b)
        if not lo then return bad("'" .. a .. "' is not a " .. f.name) end
        if not hi then return bad("'" .. b .. "' is not a " .. f.name) end
      else
        lo = value(f, range)
        if not lo then return bad("'" .. range .. "' is not a " .. f.name) end
        hi = step and f.max or lo -- "a/n" means a through the maximum
        if step and f.name == "day-of-week" then hi = 6 end
      end
      for _, v in ipairs { lo, hi } do
        if v < f.min or v > f.max then
          return bad(v .. " is out of range (" .. f.min .. "-" .. f.max .. ")")
        end
      end
      if lo > hi then return bad("range " .. lo .. "-" .. hi .. " is backwards") end
    end
    local n = 1
    if step then
      n = math.tointeger(tonumber(step:match("^%d+$") or ""))
      if not n or n == 0 then return bad("step '" .. step .. "' must be a positive integer") end
    end
    for v = lo, hi, n do set[v] = true end
  end
  if f.name == "day-of-week" and set[7] then set[0] = true; set[7] = nil end
  return set
end

--- A duration such as "30s", "5m", "1h30m", "2d" -> seconds, or nil and
-- "too long" when it exceeds MAX_INTERVAL.  Each count is checked before
-- it is multiplied, so no sum can overflow.
local function duration(s)
  if s == "" then return nil end
  local total, pos = 0, 1
  while pos <= #s do
    local n, u, nxt = s:match("^(%d+)([smhd])()", pos)
    if not n then return nil end
    n = #n <= 12 and math.tointeger(tonumber(n))
    if not n or n > M.MAX_INTERVAL then return nil, "too long" end
    total = total + n * UNITS[u]
    if total > M.MAX_INTERVAL then return nil, "too long" end
    pos = nxt
  end
  return total
end

function M.parse(s)
  if type(s) ~= "string" then
    return nil, "bad schedule: string expected, got " .. type(s)
  end
  if #s > M.MAX_LENGTH then
    return nil, "bad schedule: " .. #s .. " bytes long, at most " .. M.MAX_LENGTH
  end
  -- trimmed without backtracking: "^%s*(.-)%s*$" is quadratic in a run of
  -- inner spaces
  local first = s:find("%S")
  local text = first and s:sub(first, #s - #s:reverse():match("^%s*")) or ""
  local function bad(why) return nil, "bad schedule '" .. s .. "': " .. why end
  local every = text:match("^@every%s+(.*)$")
  if every or text == "@every" then
    local secs, why = duration(every or "")
    if why then
      return bad("interval '" .. every .. "' is too long (at most " .. M.MAX_INTERVAL // 86400 .. "d)")
    end
    if not secs or secs <= 0 then
      return bad("interval '" .. (every or "") .. "' must be a positive duration like 30s, 5m, 1h30m")
    end
    return setmetatable({ source = s, kind = "every", interval = secs }, Schedule)
  end
  if text:sub(1, 1) == "@" then
    if not ALIASES[text:lower()] then
      return bad("unknown alias '" .. text .. "' (@every DURATION, @hourly, @daily, @weekly, @monthly, @yearly)")
    end
    text = ALIASES[text:lower()]
  end
  local parts = {}
  for p in text:gmatch("%S+") do parts[#parts + 1] = p end
  if #parts ~= 5 then
    return bad(#parts .. " fields, 5 expected (minute hour day-of-month month day-of-week)")
  end
  local sch = setmetatable({ source = s, kind = "cron" }, Schedule)
  local keys = { "minute", "hour", "dom", "month", "dow" }
  for i, f in ipairs(FIELDS) do
    local set, err = parse_field(f, parts[i])
    if not set then return bad(err) end
    sch[keys[i]] = set
  end
  -- the cron rule: both day fields restricted -> either may match
  sch.dom_star = parts[3]:sub(1, 1) == "*"
  sch.dow_star = parts[5]:sub(1, 1) == "*"
  return sch
end

function Schedule:day_matches(t)
  local dom, dow = self.dom[t.day], self.dow[t.wday - 1]
  if self.dom_star or self.dow_star then return dom and dow end
  return dom or dow
end

local function norm(t)
  t.isdst = nil
  return os.date("*t", os.time(t))
end

function Schedule:next(after)
  after = math.floor(after)
  if self.kind == "every" then
    return (after // self.interval + 1) * self.interval
  end
  -- the next whole minute after `after`, then skip whole months, days,
  -- hours and minutes that cannot match
  local t = os.date("*t", after - after % 60 + 60)
  t.sec = 0
  local limit = t.year + 8
  for _ = 1, 100000 do
    if t.year > limit then return nil end
    if not self.month[t.month] then
      t = norm { year = t.year, month = t.month + 1, day = 1, hour = 0, min = 0, sec = 0 }
    elseif not self:day_matches(t) then
      t = norm { year = t.year, month = t.month, day = t.day + 1, hour = 0, min = 0, sec = 0 }
    elseif not self.hour[t.hour] then
      t = norm { year = t.year, month = t.month, day = t.day, hour = t.hour + 1, min = 0, sec = 0 }
    elseif not self.minute[t.min] then
      t = norm { year = t.year, month = t.month, day = t.day, hour = t.hour, min = t.min + 1, sec = 0 }
    else
      local at = os.time { year = t.year, month = t.month, day = t.day, hour = t.hour, min = t.min, sec = 0,
        isdst = t.isdst }
      if at > after then return at end
      t = norm { year = t.year, month = t.month, day = t.day, hour = t.hour, min = t.min + 1, sec = 0 }
    end
  end
  return nil
end

function Schedule:__tostring() return self.source end

return M
