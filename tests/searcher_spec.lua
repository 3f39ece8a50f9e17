-- require() in the drover binary reads FILE.luac beside FILE.lua instead of
-- parsing the source, only while that chunk is fresh, a binary chunk of
-- this Lua, and compiled from that very path (engine/src/searcher.c,
-- tools/compile_lua.lua, written by `make`).
local drover = require "drover"
local H = require "helper"

local COMPILE = H.root .. "/tools/compile_lua.lua"

--- The path with symbolic links resolved (mktemp's /tmp may be one).
local function realpath(p)
  local r = assert(drover.proc.run({ "realpath", p }))
  return (r.stdout:gsub("\n$", ""))
end

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function sh(argv)
  local r = assert(drover.proc.run(argv))
  assert(r.code == 0, table.concat(argv, " ") .. ": " .. r.stderr)
  return r
end

--- Set a file's modification time to `epoch` seconds.
local function touch(path, epoch) sh({ "touch", "-d", "@" .. epoch, path }) end

--- Run `code` in the drover binary with `dir` on the Lua path: code, stdout, stderr.
local function in_drover(dir, code)
  return H.drover({ "-e", code }, { env = { LUA_PATH = dir .. "/?.lua;;" } })
end

describe("compiled chunks beside the sources", function()
  local dir

  before_each(function()
    -- a realpath: chunks are named by the path require finds them at
    dir = realpath(H.tempdir())
  end)
  after_each(function() sh({ "rm", "-rf", dir }) end)

  --- m.lua compiled while it said `compiled`, then rewritten to say `source`
  -- with modification times `chunk_time` (m.luac) and `source_time` (m.lua).
  local function two_versions(chunk_time, source_time)
    write(dir .. "/m.lua", "return 'compiled'\n")
    sh({ H.drover_bin, COMPILE, dir .. "/m.lua" })
    write(dir .. "/m.lua", "return 'source'\n")
    touch(dir .. "/m.luac", chunk_time)
    touch(dir .. "/m.lua", source_time)
  end

  it("loads a chunk that is not older than its source", function()
    two_versions(2000000000, 1900000000)
    local code, out, err = in_drover(dir, "print((require 'm'))")
    assert.are.equal(0, code, err)
    assert.are.equal("compiled\n", out)
    two_versions(1900000000, 1900000000) -- the same time: fresh
    code, out = in_drover(dir, "print((require 'm'))")
    assert.are.equal(0, code)
    assert.are.equal("compiled\n", out)
  end)

  it("reads the source when it is newer than the chunk (an edit after make)", function()
    two_versions(1900000000, 2000000000)
    local code, out, err = in_drover(dir, "print((require 'm'))")
    assert.are.equal(0, code, err)
    assert.are.equal("source\n", out)
  end)

  it("reads the source when the chunk was compiled from another path (a copied tree)", function()
    two_versions(2000000000, 1900000000)
    local other = realpath(H.tempdir())
    sh({ "cp", "-p", dir .. "/m.lua", dir .. "/m.luac", other })
    local code, out, err = in_drover(other, "print((require 'm'))")
    sh({ "rm", "-rf", other })
    assert.are.equal(0, code, err)
    assert.are.equal("source\n", out)
  end)

  it("reads the source when the chunk is not this Lua's bytecode, or is text", function()
    for _, junk in ipairs { "\27Lua\x53\0garbage", "not a chunk at all", "return 'text chunk'\n", "" } do
      write(dir .. "/m.lua", "return 'source'\n")
      write(dir .. "/m.luac", junk)
      touch(dir .. "/m.lua", 1900000000)
      touch(dir .. "/m.luac", 2000000000)
      local code, out, err = in_drover(dir, "print((require 'm'))")
      assert.are.equal(0, code, err)
      assert.are.equal("source\n", out, junk)
    end
  end)

  it("gives the module its name and path, and errors their source lines, as the source would", function()
    write(dir .. "/m.lua", "local name, path = ...\nreturn function() error(name .. ' ' .. path) end\n")
    sh({ H.drover_bin, COMPILE, dir .. "/m.lua" })
    touch(dir .. "/m.lua", 1600000000)
    local code, out = in_drover(dir, "print(select(2, pcall(require 'm')))")
    assert.are.equal(0, code)
    assert.are.equal(dir .. "/m.lua:2: m " .. dir .. "/m.lua\n", out)
    -- and it was the chunk that ran: a source rewritten since says otherwise
    write(dir .. "/m.lua", "return function() error('the source') end\n")
    touch(dir .. "/m.lua", 1600000000)
    code, out = in_drover(dir, "print(select(2, pcall(require 'm')))")
    assert.are.equal(0, code)
    assert.are.equal(dir .. "/m.lua:2: m " .. dir .. "/m.lua\n", out)
  end)

  it("a module missing everywhere still gets Lua's own message", function()
    local code, _, err = in_drover(dir, "require 'no_such_module'")
    assert.are_not.equal(0, code)
    assert.matches("module 'no_such_module' not found", err, 1, true)
    assert.matches(dir .. "/no_such_module.lua", err, 1, true)
  end)

  it("compile_lua refuses a relative path", function()
    local r = assert(drover.proc.run({ H.drover_bin, COMPILE, "m.lua" }, { cwd = dir }))
    assert.are.equal(2, r.code)
    assert.matches("'m.lua' is not an absolute path to a .lua file", r.stderr, 1, true)
  end)
end)

describe("the library's own chunks", function()
  it("make compiled every module of the library, and require takes each chunk", function()
    local code, out, err = H.drover({ "-e", [[
      local find = package.searchers[2]
      for _, f in ipairs(arg) do
        local name = f:gsub("%.lua$", ""):gsub("/", ".")
        local loader, path = find(name)
        print(f, type(loader), path)
      end
    ]], table.unpack(H.lua_files()) })
    assert.are.equal(0, code, err)
    local lua_dir = realpath(H.root .. "/lua")
    for _, f in ipairs(H.lua_files()) do
      local path = lua_dir .. "/" .. f
      assert.matches(f .. "\tfunction\t" .. path, out, 1, true)
    end
  end)
end)
