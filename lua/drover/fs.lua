--- drover.fs: files, directories, hashes and tar archives on the local disk.
--
-- The primitives are C functions (engine/src/fs.c, tar.c, sha256.c) making
-- synchronous system calls: local operations on small files, where going
-- through the loop's thread pool would buy nothing.  They work the same in
-- and out of tasks.
--
-- Failures of the filesystem return nil, message, errno like Lua's io
-- library ("drover.fs.read: /x/y: No such file or directory"), so
-- assert(fs.read(p)) reads well; a wrong argument raises.
--
--   fs.read(path) -> string
--   fs.write(path, data [, {mode=}]) -> true   atomic: temp file in the same
--       directory, fsync, rename, fsync of the directory; keeps the mode of
--       the file it replaces (or opts.mode; new files: 0666 & ~umask).  A
--       symbolic link at path is replaced, not written through.
--   fs.append(path, data) -> true               creates the file if needed
--   fs.exists(path) -> boolean                  follows links, like test -e
--   fs.stat(path) -> {type, size, mode, mtime}  does not follow a final link:
--       type is "file", "directory", "link", "fifo", "socket", "char",
--       "block"; mode the permission bits (0644 -> 420); mtime in seconds
--   fs.mkdir(path [, mode]) -> true             with parents, like mkdir -p
--   fs.remove(path [, {recursive=true}]) -> true   never follows links
--   fs.list(dir) -> { names }                   sorted, without . and ..
--   fs.walk(dir [, {dirs=true}]) -> { relative paths }   sorted list of what
--       is beneath dir that is not a directory (plus directories with
--       dirs=true); links are listed, not followed
--   fs.copy(src, dst) -> true                   contents and permission bits
--   fs.rename(from, to) -> true
--   fs.tempdir([prefix]) -> path                a new 0700 directory
--   fs.sha256(path) -> hex, fs.sha256_string(data) -> hex
--   fs.tar(out_path, entries [, {mtime=0}]) -> true   reproducible ustar;
--       entries: {name=, path=} | {name=, data= [, mode=]} | {name=, type="directory"}
--   fs.untar(archive_path, dest_dir) -> { entry names }   for untrusted
--       archives: refuses absolute names, '..', links leading outside dest,
--       devices, before writing anything
--   fs.tar_dir(out_path, dir [, opts]) -> true  a whole directory tree
--   fs.join(...), fs.dirname(path), fs.basename(path)   path strings
--
-- A mode is an integer (tonumber("755", 8)) or an octal string ("755").
local core = require "drover.core"

local M = {}
for k, v in pairs(core.fs) do M[k] = v end

--- Join path pieces with single slashes: join("a/", "/b", "c") == "a/b/c".
-- An absolute first piece stays absolute.
function M.join(...)
  local parts = table.pack(...)
  local out = {}
  for i = 1, parts.n do
    local p = parts[i]
    if type(p) ~= "string" then
      error(("drover.fs.join: bad argument #%d (string expected, got %s)"):format(i, type(p)), 2)
    end
    if p ~= "" then
      if #out == 0 then
        out[1] = p:match("^(.-)/*$")
        if out[1] == "" then out[1] = "/" end
      else
        local q = p:match("^/*(.-)/*$")
        if q ~= "" then
          out[#out + 1] = (out[#out]:sub(-1) == "/") and q or ("/" .. q)
        end
      end
    end
  end
  return table.concat(out)
end

local function checkstr(fname, v)
  if type(v) ~= "string" then
    error(("drover.fs.%s: bad argument 'path' (string expected, got %s)"):format(fname, type(v)), 3)
  end
end

--- Everything before the last component: dirname("a/b/c") == "a/b",
-- dirname("c") == ".", dirname("/c") == "/".
function M.dirname(path)
  checkstr("dirname", path)
  local p = path:gsub("/+$", "")
  if p == "" then return path:sub(1, 1) == "/" and "/" or "." end
  local d = p:match("^(.*)/")
  if d == nil then return "." end
  d = d:gsub("/+$", "")
  return d == "" and "/" or d
end

--- The last component: basename("a/b/c.txt") == "c.txt".
function M.basename(path)
  checkstr("basename", path)
  local p = path:gsub("/+$", "")
  if p == "" then return path:sub(1, 1) == "/" and "/" or "" end
  return p:match("([^/]*)$")
end

--- Archive a directory tree: every directory and file beneath dir, named
-- relative to it (under opts.prefix, if given), with fs.tar's options.
-- Symbolic links are refused: ustar links are not written by fs.tar.
function M.tar_dir(out_path, dir, opts)
  checkstr("tar_dir", dir)
  if opts ~= nil and type(opts) ~= "table" then
    error("drover.fs.tar_dir: bad argument 'opts' (table or nil expected, got " .. type(opts) .. ")", 2)
  end
  local prefix = opts and opts.prefix
  if prefix ~= nil and type(prefix) ~= "string" then
    error("drover.fs.tar_dir: bad option 'prefix' (string expected, got " .. type(prefix) .. ")", 2)
  end
  local names, err, code = M.walk(dir, { dirs = true })
  if not names then return nil, err, code end
  local entries = {}
  for i, rel in ipairs(names) do
    local src = dir .. "/" .. rel
    local st, serr, scode = M.stat(src)
    if not st then return nil, serr, scode end
    local name = prefix and M.join(prefix, rel) or rel
    if st.type == "directory" then
      entries[i] = { name = name, type = "directory" }
    elseif st.type == "file" then
      entries[i] = { name = name, path = src }
    else
      return nil, ("drover.fs.tar_dir: %s: cannot archive a %s"):format(src, st.type)
    end
  end
  return M.tar(out_path, entries, { mtime = opts and opts.mtime })
end

return M
