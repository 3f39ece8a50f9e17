--- tools/compile_lua.lua [--staged DIR] FILE.lua ... -- write FILE.luac
-- beside each FILE.lua: its chunk compiled, debug information kept, which
-- require() loads instead of parsing the source while it is fresh (see
-- engine/src/searcher.c).  Run by `make` with the drover binary it builds,
-- so the bytecode is that Lua's.  A chunk is named by the path it will
-- be loaded from, which must be absolute and free of symbolic links (the
-- engine's library directory is a realpath); --staged DIR (`make install
-- DESTDIR=DIR`) compiles DIR/PATH under the name PATH, where it will be.
local args, staged = { ... }, ""
if args[1] == "--staged" then
  staged = table.remove(args, 1) and table.remove(args, 1)
end
if #args == 0 then
  io.stderr:write("usage: compile_lua.lua [--staged DIR] FILE.lua...\n")
  os.exit(2)
end
for _, file in ipairs(args) do
  local name = file:sub(1, #staged) == staged and file:sub(#staged + 1) or file
  if name:sub(1, 1) ~= "/" or name:sub(-4) ~= ".lua" then
    io.stderr:write("compile_lua: '", name, "' is not an absolute path to a .lua file\n")
    os.exit(2)
  end
  local f = assert(io.open(file, "rb"))
  local src = f:read("a")
  f:close()
  local fn, err = load(src, "@" .. name, "t")
  if not fn then
    io.stderr:write("compile_lua: ", err, "\n")
    os.exit(1)
  end
  -- written beside, then renamed over: a require() at the same moment
  -- (parallel make, a test run) reads the old chunk or the new, never half
  local out, tmp = file .. "c", file .. "c.tmp"
  f = assert(io.open(tmp, "wb"))
  assert(f:write(string.dump(fn)))
  assert(f:close())
  assert(os.rename(tmp, out))
end
