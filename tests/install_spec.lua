-- make install into a temporary prefix: the installed binary, its Lua
-- library, backends and server plugin, and a C program built against the
-- installed library with pkg-config only.
local drover = require "drover"
local H = require "helper"

describe("make install", function()
  local prefix, home

  setup(function()
    prefix = H.tempdir()
    home = H.tempdir()
    local r = drover.proc.run({ "make", "-s", "BUILD=" .. (os.getenv("DROVER_BUILD") or "build"),
      "install", "PREFIX=" .. prefix }, { cwd = H.root, timeout = 600 })
    assert(r.code == 0, r.stderr)
  end)
  teardown(function() os.execute("rm -rf " .. prefix .. " " .. home) end)

  it("installs the binary, library, header, pkg-config file, man page, Lua library and backends", function()
    for _, f in ipairs { "/bin/drover", "/lib/libdrover.a", "/lib/libdrover.so.0", "/lib/drover/server.so",
      "/include/drover.h", "/lib/pkgconfig/drover.pc", "/share/man/man1/drover.1",
      "/share/drover/lua/drover/init.lua", "/share/drover/lua/drover/dashboard/index.html",
      "/share/drover/backends/local.lua" } do
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
    ]] }, { env = { DROVER_HOME = home }, cwd = "/" }))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("up\t" .. prefix .. "/share/drover/backends/local.lua\n", r.stdout)
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
    local r = assert(drover.proc.run({ home .. "/embed" }, { env = {
      LD_LIBRARY_PATH = prefix .. "/lib", DROVER_LUA_DIR = prefix .. "/share/drover/lua" } }))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("embedded 0.1.0\n", r.stdout)
  end)
end)
