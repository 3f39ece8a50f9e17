-- make install into a temporary prefix: the installed binary, its Lua
-- library, backends and server plugin, and a C program built against the
-- installed library with pkg-config only.
local drover = require "drover"
local H = require "helper"

describe("make install", function()
  local prefix, home

  -- An environment that points at nothing in the checkout: the installed
  -- files must find each other on their own.
  local function installed_env(h)
    return { LD_LIBRARY_PATH = prefix .. "/lib", DROVER_HOME = h or home, DROVER_DAEMON = "0",
      DROVER_ROOT = false, DROVER_BIN = false, DROVER_LUA_DIR = false, DROVER_PATH = false,
      LUA_PATH = false, LUA_CPATH = false }
  end

  setup(function()
    prefix = H.tempdir()
    home = H.tempdir()
    local r = drover.proc.run({ "make", "-s", "BUILD=" .. (os.getenv("DROVER_BUILD") or "build"),
      "install", "PREFIX=" .. prefix }, { cwd = H.root, timeout = 600 })
    assert(r.code == 0, r.stderr)
  end)
  teardown(function() os.execute("rm -rf " .. prefix .. " " .. home) end)

  it("installs every Lua file of the library, subdirectories too", function()
    for _, f in ipairs(H.lua_files()) do
      assert.is_truthy(drover.fs.exists(prefix .. "/share/drover/lua/" .. f), f)
    end
  end)

  it("installs each module compiled for where it is installed, and require takes the chunks", function()
    local r = assert(drover.proc.run({ prefix .. "/bin/drover", "-e", [[
      for _, f in ipairs(arg) do
        local loader, path = package.searchers[2]((f:gsub("%.lua$", ""):gsub("/", ".")))
        print(type(loader), path)
      end
    ]], table.unpack(H.lua_files()) }, { env = installed_env(), cwd = "/" }))
    assert.are.equal(0, r.code, r.stderr)
    local want = {}
    for _, f in ipairs(H.lua_files()) do
      assert.is_truthy(drover.fs.exists(prefix .. "/share/drover/lua/" .. f .. "c"), f .. "c")
      want[#want + 1] = "function\t" .. prefix .. "/share/drover/lua/" .. f .. "\n"
    end
    assert.are.equal(table.concat(want), r.stdout)
  end)

  it("installs the binary, library, header, pkg-config file, man page, Lua library and backends", function()
    for _, f in ipairs { "/bin/drover", "/lib/libdrover.a", "/lib/libdrover.so.0", "/lib/drover/server.so",
      "/include/drover.h", "/lib/pkgconfig/drover.pc", "/share/man/man1/drover.1",
      "/share/drover/lua/drover/init.lua", "/share/drover/lua/drover/dashboard/index.html",
      "/share/drover/backends/local.lua", "/share/drover/backends/slurm/jobstate.lua",
      "/share/drover/lua/drover/orchestrator/runs.lua" } do
      assert.is_truthy(drover.fs.exists(prefix .. f), f)
    end
  end)

  it("the installed binary runs scripts, finds its backends and loads the server plugin", function()
    local r = assert(drover.proc.run({ prefix .. "/bin/drover", "-e", [[
      local d = require "drover"
      local s = assert(d.server.listen { handler = function() return 200, {}, "up" end })
      local body = d.http.get(s.url).body
      s:close()
      print(body, d.orchestrator("local").backend_path)
      -- a backend of several files (backends/slurm/) loads its parts
      print(d.orchestrator("slurm", { socket = "/nonexistent" }).backend_path)
    ]] }, { env = { DROVER_HOME = home }, cwd = "/" }))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("up\t" .. prefix .. "/share/drover/backends/local.lua\n" ..
      prefix .. "/share/drover/backends/slurm.lua\n", r.stdout)
  end)

  it("libdrover.so exports the drover_* API and luaopen_drover_core, nothing else", function()
    local r = assert(drover.proc.run({ "nm", "-D", "--defined-only", prefix .. "/lib/libdrover.so" }))
    assert.are.equal(0, r.code, r.stderr)
    local api, others = {}, {}
    for name in r.stdout:gmatch("%S+ %a ([%w_@.]+)\n") do
      if name:match("^drover_") then api[#api + 1] = name
      elseif name ~= "luaopen_drover_core" then others[#others + 1] = name end
    end
    assert.are.same({}, others)
    -- every function drover.h declares, and only those
    local header = assert(drover.fs.read(prefix .. "/include/drover.h"))
    local declared = {}
    for name in header:gmatch("\nDROVER_API [^\n(]-(drover_[%w_]+)%(") do declared[#declared + 1] = name end
    table.sort(api)
    table.sort(declared)
    assert.is_true(#declared >= 16)
    assert.are.same(declared, api)
  end)

  it("a C program embeds drover with pkg-config --cflags --libs drover alone", function()
    local src = home .. "/embed.c"
    assert(drover.fs.write(src, [[
#include <drover.h>
#include <stdio.h>
int main(void) {
  drover *D = drover_open(NULL);
  int rc = drover_dostring(D, "local d = require 'drover'; d.sleep(0.01); print('embedded ' .. d.version)", "=embed");
  if (rc != DROVER_OK) fprintf(stderr, "%s\n", drover_errmsg(D));
  drover_close(D);
  return rc == DROVER_OK ? 0 : 1;
}
]]))
    local env = { PKG_CONFIG_PATH = prefix .. "/lib/pkgconfig" }
    local flags = assert(drover.proc.run({ "pkg-config", "--cflags", "--libs", "drover" }, { env = env }))
    assert.are.equal(0, flags.code, flags.stderr)
    local argv = { "cc", "-o", home .. "/embed", src }
    if os.getenv("DROVER_BUILD") == "build-asan" then
      -- the installed library carries the sanitizer: so must its user
      argv[#argv + 1] = "-fsanitize=address,undefined"
    end
    for f in flags.stdout:gmatch("%S+") do argv[#argv + 1] = f end
    local cc = assert(drover.proc.run(argv))
    assert.are.equal(0, cc.code, cc.stderr)
    -- nothing says where the Lua library is: libdrover finds it under the
    -- prefix it was installed to (next to itself), from any directory
    local r = assert(drover.proc.run({ home .. "/embed" }, { cwd = "/", env = installed_env() }))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("embedded 0.1.0\n", r.stdout)
  end)

  it("a program linked statically with libdrover.a finds the Lua library under PREFIX", function()
    local src = home .. "/static.c"
    assert(drover.fs.write(src, [[
#include <drover.h>
#include <stdio.h>
int main(void) {
  drover *D = drover_open(NULL);
  int rc = drover_dostring(D, "print(require('drover.config').lua_dir)", "=static");
  if (rc != DROVER_OK) fprintf(stderr, "%s\n", drover_errmsg(D));
  drover_close(D);
  return rc == DROVER_OK ? 0 : 1;
}
]]))
    local env = { PKG_CONFIG_PATH = prefix .. "/lib/pkgconfig" }
    local flags = assert(drover.proc.run({ "pkg-config", "--static", "--cflags", "--libs", "drover" }, { env = env }))
    assert.are.equal(0, flags.code, flags.stderr)
    -- -l:libdrover.a picks the archive although libdrover.so sits next to it
    local argv = { "cc", "-o", home .. "/static", src }
    if os.getenv("DROVER_BUILD") == "build-asan" then argv[#argv + 1] = "-fsanitize=address,undefined" end
    for f in flags.stdout:gmatch("%S+") do argv[#argv + 1] = f == "-ldrover" and "-l:libdrover.a" or f end
    local cc = assert(drover.proc.run(argv))
    assert.are.equal(0, cc.code, cc.stderr)
    local r = assert(drover.proc.run({ home .. "/static" }, { cwd = "/", env = installed_env() }))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(prefix .. "/share/drover/lua\n", r.stdout)
  end)

  it("examples/embed builds with pkg-config alone and runs a workflow and the local backend", function()
    local out = H.tempdir()
    local env = { PKG_CONFIG_PATH = prefix .. "/lib/pkgconfig" }
    -- build in a copy, so the checkout stays clean
    local cp = assert(drover.proc.run({ "cp", H.root .. "/examples/embed/main.c", H.root .. "/examples/embed/Makefile",
      H.root .. "/examples/embed/workflow.lua", H.root .. "/examples/embed/hello_job.lua", out }))
    assert.are.equal(0, cp.code, cp.stderr)
    local argv = { "make", "-s", "-C", out, "embed" }
    if os.getenv("DROVER_BUILD") == "build-asan" then
      argv[#argv + 1] = "CC=cc -fsanitize=address,undefined"
    end
    local mk = assert(drover.proc.run(argv, { env = env }))
    assert.are.equal(0, mk.code, mk.stdout .. mk.stderr)
    local ehome = H.tempdir()
    local r = assert(drover.proc.run({ out .. "/embed", out }, { cwd = "/", env = installed_env(ehome),
      timeout = 120 }))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("HELLO FROM C\n" ..
      "workflow COMPLETED, host function called 3 times\n", r.stdout:match("^(.-\n.-\n)"))
    assert.matches("\nresult: %[\"HELLO\",\"FROM\",\"C\"%]\npackaged %x+\ndeployed hello%-embed\nrun COMPLETED\n" ..
      "logs: %[%[\"hello from a local worker, embedder\"%]%]\n$", r.stdout)
    -- drover.log() went through the program's log callback
    assert.matches("embed %[info%] workflow shouted 3 words", r.stderr)
    -- the workflow file's flow run is in the store, with its task runs
    local store = assert(require("drover.store").open(ehome))
    local runs = store:flow_runs { limit = 10 }
    local names = {}
    for _, fr in ipairs(runs) do names[#names + 1] = fr.name .. "=" .. fr.state end
    table.sort(names)
    assert.are.same({ "hello-embed=COMPLETED", "workflow=COMPLETED" }, names)
    store:close()
    os.execute("rm -rf " .. out .. " " .. ehome)
  end)
end)
