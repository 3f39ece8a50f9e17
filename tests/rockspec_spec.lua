-- rockspec/drover-scm-1.rockspec: `luarocks make` into a temporary tree
-- builds drover.core and installs the Lua library and backends; stock
-- lua5.4, with LUA_PATH/LUA_CPATH pointing at that tree and nowhere in the
-- checkout, then runs tasks, finds the backend and serves HTTP.
local drover = require "drover"
local H = require "helper"

-- The environment of a program that must see the rock only: the tree's
-- paths (";;" adds the system's defaults, where Debian's cjson lives),
-- and none of the variables that point the test suite at the checkout.
local function tree_env(tree, home)
  return {
    LUA_PATH = tree .. "/share/lua/5.4/?.lua;" .. tree .. "/share/lua/5.4/?/init.lua;;",
    LUA_CPATH = tree .. "/lib/lua/5.4/?.so;;",
    DROVER_ROOT = false, DROVER_PATH = false, DROVER_LUA_DIR = false, DROVER_BIN = false,
    DROVER_HOME = home,
  }
end

describe("the LuaRocks rockspec", function()
  local src, tree, home

  setup(function()
    src, tree, home = H.tempdir(), H.tempdir(), H.tempdir()
    -- build from a copy: the builtin build type writes its objects next to
    -- the sources, and the checkout is shared with other builds
    local cp = assert(drover.proc.run({ "cp", "-r", H.root .. "/engine", H.root .. "/lua", H.root .. "/backends",
      H.root .. "/rockspec", H.root .. "/README.md", H.root .. "/tests", src }))
    assert(cp.code == 0, cp.stderr)
    local r = assert(drover.proc.run({ "luarocks", "--lua-version=5.4", "make", "--deps-mode=none",
      "--tree=" .. tree, "rockspec/drover-scm-1.rockspec" }, { cwd = src, timeout = 600 }))
    assert(r.code == 0, "luarocks make failed:\n" .. r.stdout .. r.stderr)
  end)
  teardown(function() os.execute("rm -rf " .. src .. " " .. tree .. " " .. home) end)

  it("installs drover.core, the Lua library, the dashboard and the backends into the tree", function()
    for _, f in ipairs { "/lib/lua/5.4/drover/core.so", "/share/lua/5.4/drover/init.lua",
      "/share/lua/5.4/drover/orchestrator.lua", "/share/lua/5.4/drover/dashboard/index.html",
      "/share/lua/5.4/drover/backends/local.lua", "/share/lua/5.4/drover/backends/slurm.lua",
      "/share/lua/5.4/drover/backends/docker.lua" } do
      assert.is_truthy(drover.fs.exists(tree .. f), f)
    end
  end)

  -- The rockspec lists files by hand: a new backend or module left out of
  -- it would be missing from the rock only.
  local function files(dir, pattern)
    local out = {}
    for _, f in ipairs(assert(drover.fs.list(dir))) do
      local name = f:match(pattern)
      if name then out[#out + 1] = name end
    end
    table.sort(out)
    return out
  end

  it("installs every backends/*.lua, as drover.backends.NAME", function()
    local text = assert(drover.fs.read(H.root .. "/rockspec/drover-scm-1.rockspec"))
    local listed = {}
    for name, file in text:gmatch('%["drover%.backends%.([%w_%-]+)"%]%s*=%s*"backends/([%w_%-]+)%.lua"') do
      assert.are.equal(name, file)
      listed[#listed + 1] = name
    end
    table.sort(listed)
    local want = files(H.root .. "/backends", "^([%w_%-]+)%.lua$")
    assert.is_true(#want >= 3)
    assert.are.same(want, listed)
    for _, name in ipairs(want) do
      assert.is_truthy(drover.fs.exists(tree .. "/share/lua/5.4/drover/backends/" .. name .. ".lua"), name)
    end
  end)

  it("builds every Lua file under lua/drover, subdirectories too, as its module", function()
    local spec = {}
    assert(loadfile(H.root .. "/rockspec/drover-scm-1.rockspec", "t", spec))()
    local by_path = {}
    for mod, path in pairs(spec.build.modules) do if type(path) == "string" then by_path[path] = mod end end
    for _, f in ipairs(H.lua_files()) do
      local want = f:gsub("%.lua$", ""):gsub("/init$", ""):gsub("/", ".")
      assert.are.equal(want, by_path["lua/" .. f], "lua/" .. f)
    end
  end)

  it("builds every lua/drover/*.lua as a module", function()
    local spec = {}
    assert(loadfile(H.root .. "/rockspec/drover-scm-1.rockspec", "t", spec))()
    local listed = {}
    for mod, path in pairs(spec.build.modules) do
      local name = type(path) == "string" and path:match("^lua/drover/([%w_]+)%.lua$")
      if name then
        assert.are.equal(name == "init" and "drover" or "drover." .. name, mod)
        listed[#listed + 1] = name
      end
    end
    table.sort(listed)
    assert.are.same(files(H.root .. "/lua/drover", "^([%w_]+)%.lua$"), listed)
  end)

  it("builds every engine source but api.c and searcher.c (the rockspec lists them by hand)", function()
    local text = assert(drover.fs.read(H.root .. "/rockspec/drover-scm-1.rockspec"))
    local listed, want = {}, {}
    for f in text:gmatch('"engine/src/([%w_]+%.c)"') do listed[#listed + 1] = f end
    local ls = assert(drover.proc.output({ "ls", H.root .. "/engine/src" }))
    for f in ls:gmatch("[^\n]+") do
      if f:match("%.c$") and f ~= "api.c" and f ~= "searcher.c" then want[#want + 1] = f end
    end
    table.sort(listed)
    assert.are.same(want, listed)
  end)

  it("stock lua5.4 requires drover from the tree and runs tasks, processes and the server", function()
    local r = assert(drover.proc.run({ "lua5.4", "-e", [[
      local d = require "drover"
      local out = d.run(function()
        local results = d.all {
          function() return d.proc.run({ "echo", "from a process" }).stdout end,
          function() d.sleep(0.01); return "after a sleep" end,
        }
        return results[1] .. results[2]
      end)
      local s = assert(d.server.listen { handler = function() return 200, {}, "served" end })
      local body = d.run(function() return d.http.get(s.url).body end)
      s:close()
      print(out, body)
      print(package.searchpath("drover", package.path))
      print(package.searchpath("drover.core", package.cpath))
      print(d.orchestrator("local").backend_path)
    ]] }, { cwd = "/", env = tree_env(tree, home), timeout = 120 }))
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("from a process\nafter a sleep\tserved", lines[1] .. "\n" .. lines[2])
    assert.are.equal(tree .. "/share/lua/5.4/drover/init.lua", lines[3])
    assert.are.equal(tree .. "/lib/lua/5.4/drover/core.so", lines[4])
    assert.are.equal(tree .. "/share/lua/5.4/drover/backends/local.lua", lines[5])
  end)

  it("a tracked flow with task runs records them in the store", function()
    local r = assert(drover.proc.run({ "lua5.4", "-e", [[
      local d = require "drover"
      local double = d.task("double", function(x) d.sleep(0.01); return 2 * x end)
      local flow = d.flow("twice", function() return double(3) + double(4) end)
      print(d.run(flow))
      local s = require("drover.tracker").default_store()
      local runs = s:flow_runs { limit = 5 }
      local doubles = 0
      for _, t in ipairs(s:task_runs(runs[1].id)) do
        if t.name == "double" and t.state == "COMPLETED" then doubles = doubles + 1 end
      end
      print(#runs, runs[1].state, doubles)
    ]] }, { cwd = "/", env = tree_env(tree, home), timeout = 120 }))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("14\n1\tCOMPLETED\t2\n", r.stdout)
  end)

  it("its test section's busted run passes against the installed rock", function()
    -- what `luarocks test` runs; it cannot run here itself, because it
    -- insists on busted being a rock and no rocks server is reachable
    local spec = {}
    assert(loadfile(H.root .. "/rockspec/drover-scm-1.rockspec", "t", spec))()
    assert.are.equal("busted", spec.test.type)
    local argv = { "busted", "-o", "TAP" }
    for _, f in ipairs(spec.test.flags) do argv[#argv + 1] = f end
    local r = assert(drover.proc.run(argv, { cwd = src, env = tree_env(tree, H.tempdir()), timeout = 600 }))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("\n1%.%.%d+", r.stdout)
    assert.is_nil(r.stdout:find("not ok"))
  end)
end)
