-- Resource limits per deployment (local backend: max_memory,
-- max_open_files, max_processes), applied to real workers with prlimit.
local drover = require "drover"
local json = require "drover.json"
local store_mod = require "drover.store"
local H = require "helper"

local FLOW = [[
local drover = require "drover"
local Hog = drover.class("Hog")
Hog.integration_type = "pipeline"
function Hog:main(params)
  if params.mode == "files" then
    local n, keep = 0, {}
    while true do
      local f = io.open("/dev/null")
      if not f then break end
      n = n + 1
      keep[n] = f
    end
    return n
  end
  local s = string.rep("x", 512 * 1024 * 1024) -- more than the limit lets it have
  return #s
end
return Hog
]]

describe("resource limits of a deployment's workers", function()
  local home, store

  local function drv(args) return H.drover(args, { env = { DROVER_HOME = home, DROVER_DAEMON = "0" } }) end

  local function finished(id)
    return H.wait_until(function()
      local r = store:flow_run(id)
      return r and (r.state == "COMPLETED" or r.state == "FAILED" or r.state == "CRASHED") and r
    end, 120, "run " .. id .. " to end")
  end

  setup(function()
    home = H.tempdir()
    assert(drover.fs.mkdir(home .. "/src"))
    assert(drover.fs.write(home .. "/src/hog.lua", FLOW))
    local code, out, err = drv({ "package", "--module", "hog", "--class", "Hog", "--entrypoint", "main",
      "--path", home .. "/src", "--json" })
    assert.are.equal(0, code, err)
    local pkg = json.decode(out).id
    for _, d in ipairs {
      { "free" }, { "files", "--set", "max_open_files=40" }, { "mem", "--set", "max_memory=300000000" },
    } do
      local args = { "deploy", d[1], "--package", pkg }
      for i = 2, #d do args[#args + 1] = d[i] end
      code, _, err = drv(args)
      assert.are.equal(0, code, err)
    end
    store = assert(store_mod.open(home))
  end)

  teardown(function()
    if store then store:close() end
    os.execute("rm -rf " .. home)
  end)

  it("max_open_files caps the worker's descriptors; without it the inherited limit holds", function()
    local code, out, err = drv({ "run", "files", "mode=files" })
    assert.are.equal(0, code, err)
    local r = finished(out:match("^(%x+)"))
    assert.are.equal("COMPLETED", r.state, r.message)
    local capped = math.tointeger(json.decode(r.result))
    assert.is_true(capped > 0 and capped < 40, "opened " .. tostring(capped))
    code, out = drv({ "run", "free", "mode=files" })
    assert.are.equal(0, code)
    r = finished(out:match("^(%x+)"))
    assert.is_true(math.tointeger(json.decode(r.result)) > 40)
  end)

  it("max_memory caps the address space: a flow that wants more fails, saying so", function()
    local code, out, err = drv({ "run", "mem", "mode=mem" })
    assert.are.equal(0, code, err)
    local r = finished(out:match("^(%x+)"))
    assert.are.equal("FAILED", r.state)
    assert.matches("not enough memory", r.message)
  end)

  it("a limit that is not a whole number in range is refused in one line", function()
    local code, _, err = drv({ "deploy", "bad", "--package", "x", "--set", "max_open_files=2.5" })
    assert.are.equal(2, code)
    assert.matches("max_open_files", err)
    assert.are.equal(1, select(2, err:gsub("\n", "")))
    code, _, err = drv({ "deploy", "bad", "--package", "x", "--set", "max_memory=1000" })
    assert.are.equal(2, code)
    assert.matches("max_memory", err)
  end)
end)
