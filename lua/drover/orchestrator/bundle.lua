--- package(): the bundle `drover worker` runs, the one every backend
-- inherits from BaseOrchestrator (docker builds its image around it, slurm
-- stages it).  A content-addressed, deterministic tar of the workflow
-- module and the project Lua files it requires, plus manifest.json, kept
-- under DROVER_HOME/packages and recorded in the store.
local fs = require "drover.fs"
local store_mod = require "drover.store"

local M = { methods = {} }

local function module_file(root, module)
  local rel = module:gsub("%.", "/")
  for _, cand in ipairs { rel .. ".lua", rel .. "/init.lua" } do
    if fs.exists(root .. "/" .. cand) then return cand end
  end
end

--- The module's file and every project file it requires, transitively
-- (found by reading `require "x"` calls: modules outside the project, such
-- as drover itself, are left to the worker's own path).
local function collect(root, module)
  local files, seen, todo = {}, {}, { module }
  while #todo > 0 do
    local m = table.remove(todo)
    local rel = module_file(root, m)
    if rel and not seen[rel] then
      seen[rel] = true
      files[#files + 1] = rel
      local src = assert(fs.read(root .. "/" .. rel))
      for dep in src:gmatch("require%s*%(?%s*[\"']([%w_%.%-]+)[\"']") do todo[#todo + 1] = dep end
    end
  end
  table.sort(files)
  return files
end

--- package(class_name, module, entrypoint, opts) -> the package record
-- { id, sha256, location, manifest, ... }; opts.path is the project
-- directory (default ".").  The same sources give the same id.
function M.methods:package(class_name, module, entrypoint, opts)
  opts = opts or {}
  local who = tostring(self.backend_name) .. ".package"
  if type(module) ~= "string" or module == "" then
    error(who .. ": bad argument 'module' (Lua module name expected, got " .. type(module) .. ")", 2)
  end
  local root = opts.path or "."
  if not module_file(root, module) then
    error(who .. ": module '" .. module .. "' not found under " .. root, 2)
  end
  local manifest = { module = module, class = class_name, entrypoint = entrypoint or "run",
    drover_version = require("drover").version, files = {} }
  local entries = {}
  for _, rel in ipairs(collect(root, module)) do
    manifest.files[rel] = fs.sha256(root .. "/" .. rel)
    entries[#entries + 1] = { name = "src/" .. rel, path = root .. "/" .. rel }
  end
  entries[#entries + 1] = { name = "manifest.json", data = require("drover.tracker").canonical(manifest) }
  local store = self:store()
  local dir = store.home .. "/packages"
  fs.mkdir(dir)
  local tmp = dir .. "/.pkg-" .. store_mod.new_id() .. ".tar"
  local ok, err = fs.tar(tmp, entries)
  if not ok then error(who .. ": " .. tostring(err), 2) end
  local sha = fs.sha256(tmp)
  local location = dir .. "/" .. sha .. ".tar"
  assert(fs.rename(tmp, location))
  -- backend "local": a plain bundle, whoever built it (docker and slurm
  -- record their own, with an image or a staged copy)
  local p = { id = sha, sha256 = sha, backend = "local", class = class_name, module = module,
    entrypoint = manifest.entrypoint, location = location, manifest = manifest }
  store:put_package(p)
  return p
end

return M
