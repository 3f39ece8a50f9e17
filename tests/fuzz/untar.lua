-- Fuzz harness: drover.fs.untar (engine/src/tar.c), which extracts
-- packages that come from elsewhere.  The input is the archive.
-- Properties:
--   untar never raises: a list of names, or nil and a message;
--   nothing is written outside the destination: while untar runs, the
--   driver checks every path the engine creates or opens through *at()
--   calls (confine), and afterwards the sandbox around the destination
--   holds only what was there, the sentinel file is unchanged, and every
--   symbolic link extracted resolves (lexically) inside the destination
--   (fs.walk lists links without following them).
local fs = require "drover.fs"

local helpers = ...
-- sandbox/a/b/c/d/dest: names with ".." land in the sandbox, where the
-- walk sees them, rather than somewhere in /tmp
local sandbox = helpers.home .. "/untar"
local deep = sandbox .. "/a/b/c/d"
local dest = deep .. "/dest"
local archive = sandbox .. "/in.tar"
local sentinel = deep .. "/sentinel"
assert(fs.mkdir(deep))
assert(fs.write(sentinel, "sentinel\n"))

local function before_set()
  local set = {}
  for _, p in ipairs(assert(fs.walk(sandbox, { dirs = true }))) do set[p] = true end
  return set
end
local known

-- the directory a link's target names, lexically, relative to dest, or
-- nil when it leaves it
local function resolve(link_rel, target)
  local parts = {}
  for p in link_rel:gmatch("[^/]+") do parts[#parts + 1] = p end
  parts[#parts] = nil -- the link itself
  if target:sub(1, 1) == "/" then return nil end
  for p in target:gmatch("[^/]+") do
    if p == ".." then
      if #parts == 0 then return nil end
      parts[#parts] = nil
    elseif p ~= "." then
      parts[#parts + 1] = p
    end
  end
  return table.concat(parts, "/")
end

return function(data)
  fs.remove(dest, { recursive = true })
  local f = assert(io.open(archive, "wb")) -- not fs.write: its fsync would cost more than the untar
  f:write(data)
  f:close()
  known = known or before_set()
  assert(fs.mkdir(dest))
  helpers.confine(dest)
  local ok, names, err = pcall(fs.untar, archive, dest)
  helpers.confine(nil)
  if not ok then error("untar raised: " .. tostring(names)) end
  if not names and type(err) ~= "string" then error("untar failed without a message") end
  if fs.read(sentinel) ~= "sentinel\n" then error("the sentinel outside the destination changed") end
  for _, p in ipairs(assert(fs.walk(sandbox, { dirs = true }))) do
    if not known[p] and p ~= "a/b/c/d/dest" and p:sub(1, 13) ~= "a/b/c/d/dest/" then
      error("untar wrote " .. p .. " outside the destination")
    end
  end
  if fs.exists(dest) then
    for _, p in ipairs(assert(fs.walk(dest))) do
      local target = helpers.readlink(dest .. "/" .. p)
      if target and not resolve(p, target) then
        error("link " .. p .. " -> " .. target .. " leaves the destination")
      end
    end
  end
end
