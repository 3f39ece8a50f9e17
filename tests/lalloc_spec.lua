-- The allocator of the Lua states drover_open makes (engine/src/lalloc.c):
-- small blocks from free lists per size class, larger ones from malloc.
-- A script in the drover binary builds, grows, shrinks and frees strings
-- and tables of every size around the pool's limit, through full
-- collections, and checks every byte it wrote: a block handed out twice,
-- cut short, or moved without its contents would show as a wrong value.
local H = require "helper"

describe("the Lua state's allocator", function()
  it("keeps every block whole, across size classes and the pool's limit, through collections", function()
    local script = [[
      local function fill(t, n, seed)
        for i = 1, n do t[i] = seed * 1000 + i end
      end
      local function check(t, n, seed, what)
        for i = 1, n do
          if t[i] ~= seed * 1000 + i then error(what .. ": element " .. i .. " is " .. tostring(t[i])) end
        end
      end
      local keep = {}
      for round = 1, 6 do
        -- strings of every length to 600 bytes (blocks to 640), kept and dropped
        for len = 1, 600 do
          local s = string.rep(string.char(65 + (len + round) % 26), len)
          if len % 3 == round % 3 then keep[#keep + 1] = s end
        end
        -- tables whose array part grows by doubling past the limit, then
        -- shrinks again when rehashed smaller; hashes with string keys
        local ts = {}
        for n = 1, 80 do
          local t = {}
          fill(t, n, n + round)
          ts[n] = t
          local h = {}
          for i = 1, n do h["k" .. i] = i * round end
          ts[-n] = h
        end
        collectgarbage("collect")
        for n = 1, 80 do
          check(ts[n], n, n + round, "table " .. n)
          local h = ts[-n]
          for i = 1, n do
            if h["k" .. i] ~= i * round then error("hash " .. n .. " key k" .. i) end
            h["k" .. i] = nil
          end
          for i = n, 1, -1 do ts[n][i] = nil end
          ts[n][1] = "x"
          for i = 2, n + 40 do ts[n][i] = i end -- regrown after shrinking
        end
        ts = nil
        if round % 2 == 0 then keep = {} end
        collectgarbage("collect")
      end
      for _, s in ipairs(keep) do
        if s ~= string.rep(s:sub(1, 1), #s) then error("a kept string changed: " .. s:sub(1, 20)) end
      end
      -- coroutines (stacks that grow and shrink) and closures
      local cos = {}
      for i = 1, 200 do
        cos[i] = coroutine.wrap(function(a)
          local function deep(k) if k == 0 then return coroutine.yield(a) end return deep(k - 1) + 1 end
          return deep(i % 60)
        end)
        assert(cos[i](i) == i)
      end
      collectgarbage("collect")
      for i = 1, 200 do assert(cos[i](0) == i % 60) end
      print("ok " .. math.floor(collectgarbage("count")))
    ]]
    local code, out, err = H.drover({ "-e", script }, { timeout = 120 }) -- a broken heap may loop
    assert.are.equal(0, code, err)
    assert.matches("^ok %d+\n$", out)
  end)
end)
