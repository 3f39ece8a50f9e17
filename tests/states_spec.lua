-- drover.states is the one list of run states: the store's SQL, the
-- daemon and the backends take theirs from it.
local H = require "helper"
local states = require "drover.states"

describe("drover.states", function()
  it("lists every state once, and the final and active sets split them", function()
    local seen = {}
    for _, s in ipairs(states.all) do
      assert.are.equal(s, states[s])
      assert.is_nil(seen[s], s)
      seen[s] = true
      assert.is_true(states.final[s] ~= states.active[s], s .. " is exactly one of final and active")
    end
    for _, list in ipairs { states.final_list, states.active_list, states.working_list, states.ended_by_worker_list } do
      for _, s in ipairs(list) do assert.is_true(seen[s], s) end
    end
    for _, s in ipairs(states.working_list) do assert.is_true(states.active[s], s) end
    for _, s in ipairs(states.ended_by_worker_list) do assert.is_true(states.final[s], s) end
    assert.is_true(states.is_final("CRASHED"))
    assert.is_false(states.is_final("RUNNING"))
    assert.is_true(states.is_active("CANCELLING"))
  end)

  it("sql_list quotes known states and refuses anything else", function()
    assert.are.equal("'SCHEDULED','PENDING','RUNNING','CANCELLING'", states.sql_list(states.active_list))
    assert.are.equal("'COMPLETED','FAILED','CANCELLED','CRASHED'", states.sql_list(states.final_list))
    assert.has_error(function() states.sql_list { "RUNNING", "x') OR 1=1 --" } end,
      "states.sql_list: 'x') OR 1=1 --' is not a run state")
    assert.has_error(function() states.sql_list { "all" } end, "states.sql_list: 'all' is not a run state")
    assert.has_error(function() states.sql_list {} end, "states.sql_list: empty list")
  end)

  it("no other Lua file writes a list of states by hand", function()
    -- two or more quoted state names in a row: an SQL IN list or a Lua
    -- table of states, which belongs in drover.states
    local function is_state(w) return states[w] == w end
    local offenders = {}
    local p = io.popen("find " .. H.root .. "/lua " .. H.root .. "/backends " .. H.root .. "/examples -name '*.lua'")
    for path in p:lines() do
      if not path:match("/drover/states%.lua$") then
        local f = assert(io.open(path))
        local n = 0
        for line in f:lines() do
          n = n + 1
          for a, b in line:gmatch("['\"](%u+)['\"]%s*,%s*['\"](%u+)['\"]") do
            if is_state(a) and is_state(b) then offenders[#offenders + 1] = path:sub(#H.root + 2) .. ":" .. n end
          end
        end
        f:close()
      end
    end
    p:close()
    assert.are.same({}, offenders)
  end)
end)
