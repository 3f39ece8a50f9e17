-- drover.cron: parsing schedules and computing their next fire times (in
-- local time: every expectation is built with os.time, so the table holds in
-- any time zone; the dates avoid daylight-saving changes).
local cron = require "drover.cron"
local proc = require "drover.proc"
local H = require "helper"

local function at(y, mo, d, h, mi, s)
  return os.time { year = y, month = mo, day = d, hour = h or 0, min = mi or 0, sec = s or 0 }
end

-- Fri 2026-01-02 10:17:30 local time
local T0 = at(2026, 1, 2, 10, 17, 30)

describe("drover.cron", function()
  it("computes next() for a table of cron expressions", function()
    local cases = {
      { "* * * * *", T0, at(2026, 1, 2, 10, 18) },
      { "*/5 * * * *", T0, at(2026, 1, 2, 10, 20) },
      { "0 * * * *", T0, at(2026, 1, 2, 11, 0) },
      { "17 10 * * *", T0, at(2026, 1, 3, 10, 17) },          -- strictly after
      { "17 10 * * *", at(2026, 1, 2, 10, 16, 59), at(2026, 1, 2, 10, 17) },
      { "30 9 * * *", T0, at(2026, 1, 3, 9, 30) },
      { "0 0 1 * *", T0, at(2026, 2, 1, 0, 0) },
      { "0 0 1 1 *", T0, at(2027, 1, 1, 0, 0) },
      { "5,10,50 * * * *", T0, at(2026, 1, 2, 10, 50) },
      { "10-20/3 * * * *", T0, at(2026, 1, 2, 10, 19) },
      { "7/20 * * * *", T0, at(2026, 1, 2, 10, 27) },          -- 7, 27, 47
      { "0 9 * * MON", T0, at(2026, 1, 5, 9, 0) },            -- 2026-01-05 is a Monday
      { "0 9 * * mon-wed", T0, at(2026, 1, 5, 9, 0) },
      { "0 9 * * 0", T0, at(2026, 1, 4, 9, 0) },               -- Sunday
      { "0 9 * * 7", T0, at(2026, 1, 4, 9, 0) },               -- 7 is Sunday too
      { "0 9 * * SAT,SUN", T0, at(2026, 1, 3, 9, 0) },
      { "0 0 * FEB *", T0, at(2026, 2, 1, 0, 0) },
      { "0 0 1 jul *", T0, at(2026, 7, 1, 0, 0) },
      { "0 0 29 2 *", T0, at(2028, 2, 29, 0, 0) },            -- the next leap day
      { "0 0 31 * *", at(2026, 4, 1), at(2026, 5, 31, 0, 0) }, -- April has 30 days
      -- day-of-month OR day-of-week when both are restricted
      { "0 0 13 * FRI", T0, at(2026, 1, 9, 0, 0) },            -- Friday the 9th first
      { "0 0 13 * FRI", at(2026, 1, 9, 1), at(2026, 1, 13, 0, 0) },
      -- a day field starting with * does not take part in the OR
      { "0 0 */2 * FRI", T0, at(2026, 1, 9, 0, 0) },          -- odd days AND Friday
      { "@hourly", T0, at(2026, 1, 2, 11, 0) },
      { "@daily", T0, at(2026, 1, 3, 0, 0) },
      { "@midnight", T0, at(2026, 1, 3, 0, 0) },
      { "@weekly", T0, at(2026, 1, 4, 0, 0) },
      { "@monthly", T0, at(2026, 2, 1, 0, 0) },
      { "@yearly", T0, at(2027, 1, 1, 0, 0) },
      { "  1 2 3 4 5  ", T0, nil }, -- filled in below (whitespace is fine)
    }
    for _, c in ipairs(cases) do
      local s, err = cron.parse(c[1])
      assert(s, err)
      if c[3] then
        assert.are.equal(os.date("%c", c[3]), os.date("%c", s:next(c[2])), c[1])
        assert.are.equal(c[3], s:next(c[2]), c[1])
      end
    end
    -- "1 2 3 4 5": 02:01 on April 3rd or on any Friday in April
    assert.are.equal(at(2026, 4, 3, 2, 1), cron.parse("1 2 3 4 5"):next(T0))
    assert.are.equal(at(2026, 4, 10, 2, 1), cron.parse("1 2 3 4 5"):next(at(2026, 4, 3, 2, 1)))
  end)

  it("walks a sequence of fire times", function()
    local s = assert(cron.parse("0,30 9-10 * * 1-5"))
    local t, got = T0, {}
    for i = 1, 5 do t = s:next(t); got[i] = os.date("%Y-%m-%d %H:%M", t) end
    assert.are.same({ "2026-01-02 10:30", "2026-01-05 09:00", "2026-01-05 09:30", "2026-01-05 10:00",
      "2026-01-05 10:30" }, got)
  end)

  it("never fires an impossible date", function()
    assert.is_nil(assert(cron.parse("0 0 30 2 *")):next(T0))
  end)

  it("interval schedules fire at multiples of the interval", function()
    local cases = {
      { "@every 1s", 1 }, { "@every 30s", 30 }, { "@every 5m", 300 }, { "@every 1h30m", 5400 },
      { "@every 2d", 172800 }, { "@every   10s", 10 },
    }
    for _, c in ipairs(cases) do
      local s = assert(cron.parse(c[1]))
      assert.are.equal("every", s.kind)
      assert.are.equal(c[2], s.interval)
      local n = s:next(T0)
      assert.are.equal(0, n % c[2], c[1])
      assert.is_true(n > T0 and n <= T0 + c[2], c[1])
      assert.are.equal(n + c[2], s:next(n))
      assert.are.equal(n, s:next(n - 0.5))
    end
    assert.are.equal(1001, cron.parse("@every 1s"):next(1000))
    assert.are.equal(1001, cron.parse("@every 1s"):next(1000.9))
  end)

  it("rejects bad schedules with a message naming the field", function()
    local cases = {
      { "61 * * * *", "bad minute field '61': 61 is out of range %(0%-59%)" },
      { "* 24 * * *", "bad hour field '24': 24 is out of range %(0%-23%)" },
      { "* * 0 * *", "bad day%-of%-month field '0': 0 is out of range %(1%-31%)" },
      { "* * 32 * *", "bad day%-of%-month field '32'" },
      { "* * * 13 *", "bad month field '13': 13 is out of range %(1%-12%)" },
      { "* * * FOO *", "bad month field 'FOO': 'FOO' is not a month" },
      { "* * * * 8", "bad day%-of%-week field '8': 8 is out of range %(0%-7%)" },
      { "* * * * MON-BAD", "bad day%-of%-week field 'MON%-BAD': 'BAD' is not a day%-of%-week" },
      { "*/0 * * * *", "bad minute field '%*/0': step '0' must be a positive integer" },
      { "*/x * * * *", "bad minute field '%*/x': step 'x'" },
      { "5-1 * * * *", "bad minute field '5%-1': range 5%-1 is backwards" },
      { "1,,2 * * * *", "bad minute field '1,,2': empty list item" },
      { "a * * * *", "bad minute field 'a'" },
      { "-1 * * * *", "bad minute field '%-1'" },
      { "* * * *", "4 fields, 5 expected" },
      { "* * * * * *", "6 fields, 5 expected" },
      { "", "0 fields, 5 expected" },
      { "@every", "interval '' must be a positive duration" },
      { "@every 0s", "interval '0s' must be a positive duration" },
      { "@every 5x", "interval '5x'" },
      { "@every 5", "interval '5'" },
      { "@every -5s", "interval '%-5s'" },
      { "@fortnightly", "unknown alias '@fortnightly'" },
    }
    for _, c in ipairs(cases) do
      local s, err = cron.parse(c[1])
      assert.is_nil(s, c[1])
      assert.matches("^bad schedule '", err, nil, c[1])
      assert.matches(c[2], err, nil, c[1])
      assert.is_nil(err:find("\n"))
    end
    local s, err = cron.parse(nil)
    assert.is_nil(s)
    assert.matches("string expected, got nil", err)
  end)

  -- issue 12, item 7: trimming was quadratic in a run of spaces (40,000
  -- took 10 s, and the daemon re-parses deployed schedules every second).
  -- A 1 MiB schedule would take hours that way; in a child process with a
  -- generous deadline it must be refused by its length at once.
  it("refuses a schedule longer than 1 KiB by its length, without parsing it", function()
    local r = assert(proc.run({ H.lua, "-e", [[
      local cron = require "drover.cron"
      local s, err = cron.parse("*" .. (" "):rep(1024 * 1024) .. "x")
      io.write(tostring(s), "|", err)
    ]] }, { timeout = 120 }))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("nil|bad schedule: 1048578 bytes long, at most 1024", r.stdout)
    assert.are.equal("bad schedule: 1025 bytes long, at most 1024", select(2, cron.parse((" "):rep(1025))))
  end)

  it("parses a schedule padded to 900 bytes", function()
    local s = (" "):rep(300) .. "*/5" .. (" "):rep(150) .. "* * * *" .. (" "):rep(440)
    assert.are.equal(900, #s)
    local sch = assert(cron.parse(s))
    assert.are.equal(at(2026, 1, 2, 10, 20), sch:next(T0))
    assert.are.equal(s, tostring(sch))
    assert.are.equal(at(2026, 1, 2, 10, 20), assert(cron.parse("*/5" .. (" "):rep(1014) .. "* * * *")):next(T0))
  end)

  -- issue 12, item 7: 307445734561825861m * 60 wrapped around to 44 s.
  it("refuses an @every interval that overflows or exceeds ten years", function()
    for _, text in ipairs { "@every 307445734561825861m", "@every 3650d1s", "@every 99999999999999999999999s",
      "@every 1d" .. ("9"):rep(30) .. "s", "@every 87600h1m" } do
      local sch, err = cron.parse(text)
      assert.is_nil(sch, text)
      assert.are.equal("bad schedule '" .. text .. "': interval '" .. text:sub(8) .. "' is too long (at most 3650d)",
        err)
    end
    assert.are.equal(3650 * 86400, assert(cron.parse("@every 3650d")).interval)
    assert.are.equal(3650 * 86400, assert(cron.parse("@every 87600h")).interval)
    assert.are.equal(400, assert(cron.parse("@every " .. ("1s"):rep(400))).interval)
  end)
end)
