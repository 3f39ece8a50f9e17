--- The `docker` backend: workflows packaged as container images and run on
-- a Docker Engine, as containers or as swarm jobs.  Everything goes through
-- the Engine API on its unix socket (drover.http with unix_socket), never
-- the docker CLI.  Extends the local backend: the bundle, the deployment
-- bookkeeping, the worker (`drover worker RUN_ID`) are local's.
--
--   package  local's deterministic bundle, then POST /build with a
--            deterministic tar context (Dockerfile FROM the base image,
--            drover, its Lua library, the bundle); the build log streams to
--            stderr; tag and labels derive from the package id (the sha256
--            of the context)
--   deploy   records image, command, env, memory, cpus and mode
--            (container | swarm); refuses an image the engine lacks; keeps
--            the effective socket and base image (saved_config), so status
--            from a process without DROVER_DOCKER_* asks the same engine
--   run      container mode: POST /containers/create + /start (rlimits
--            within the host's hard limits: see Docker:ulimits); swarm mode:
--            POST /services/create with a ReplicatedJob.  With api_url the
--            container runs `drover worker RUN_ID --api URL`: it downloads
--            the bundle from `drover serve` and reports there over HTTP with
--            its run's token (in its environment, never in its argv); no
--            store, no staging directory is mounted, only the CA file if
--            one is configured.  Without api_url (the shared-store
--            fallback) it runs `drover worker RUN_ID` with DROVER_HOME
--            bind-mounted at the same path, tracking into the host's store
--            directly (one host: see docs/docker.md)
--   stop     everything labelled drover.deployment=NAME is stopped and
--            removed; active runs go CANCELLING, then CANCELLED; the
--            deployment is paused
--   cancel   one active run: the same machinery on what is labelled
--            drover.run=ID (its container; swarm: its service and the
--            task's container); CANCELLING, then CANCELLED; the deployment
--            stays active
--   status   the store's record, reconciled with the engine: a container
--            that ended without the worker recording an end makes the run
--            FAILED (exit code) or CRASHED (killed); an engine that cannot
--            be reached raises and changes nothing
--   is_alive the liveness hook: the run's container (swarm: its task) still
--            runs; nil when the engine cannot be asked
--   logs     the engine's logs (8-byte stream frames demultiplexed), with
--            follow; the store's lines once the container is gone
local drover = require "drover"
local fs = require "drover.fs"
local http = require "drover.http"
local json = require "drover.json"
local states = require "drover.states"
local store_mod = require "drover.store"

local Local = require("drover.orchestrator").backend_class("local")
local Docker = Local:extend("docker")
Docker.backend_name = "docker"
Docker.config_keys = {
  drover_bin = "string",   -- the drover binary copied into images (default: as local finds it)
  stop_timeout = { "number", min = 0 }, -- seconds a container gets between SIGTERM and SIGKILL on stop
  socket = "string",       -- the engine's unix socket (default: DROVER_DOCKER_SOCKET, /var/run/docker.sock)
  base_image = "string",   -- the image packages start FROM (default: DROVER_DOCKER_BASE_IMAGE, drover-base:latest)
  mode = { "string", enum = { "container", "swarm" } }, -- default mode of deployments
  api_timeout = "number",  -- seconds for one non-streaming API call (default 120)
  api_url = "string",      -- drover serve's URL the containers report to ("auto": the daemon serving
                           -- this store); unset: the shared-store fallback (DROVER_HOME bind-mounted)
  ca_file = "string",      -- CA bundle (a path on the engine's host) to verify api_url's certificate
  network = "string",      -- the network containers join (default with api_url: "host" when api_url
                           -- names a loopback address, which no other network reaches; else the engine's)
  ulimits = "table",       -- rlimits of containers, NAME = n or { soft = n, hard = n } (default: nofile
                           -- and nproc at this process's hard limits; see ulimits below)
}

local IMAGE_DROVER = "/opt/drover"   -- where drover lives inside the images
local CA_PATH = "/run/drover/ca.pem"  -- where the CA file is mounted (read-only) inside containers
local LABEL = "drover.deployment"
--- A PENDING run the engine has no container or service for, this many
-- seconds after it was created, never started (its submitter died).
Docker.never_started_after = 600

--- Text from the engine (or curl) fit for a one-line error: whitespace
-- collapsed, at most ~200 characters (the start and the end, which for a
-- build error holds the exit code).
local function one_line(s)
  s = tostring(s or ""):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")
  if #s > 200 then s = s:sub(1, 140) .. " ... " .. s:sub(-55) end
  return s
end
Docker.one_line = one_line

--- The config's values checked once, where it is given (the types are
-- Base's).  ca_file is checked where a run starts: a worker configured as
-- deployed, inside a container, does not have it.
function Docker:init(config)
  Local.init(self, config)
  local c = self.config
  if c.api_url and c.api_url ~= "auto" and not c.api_url:match("^https?://[^/]") then
    error("backend 'docker': bad api_url '" .. c.api_url ..
      "' (the http:// or https:// URL of drover serve, or \"auto\" for the daemon serving this store)", 3)
  end
  if c.ca_file and not c.ca_file:match("^/") then
    error("backend 'docker': bad ca_file '" .. c.ca_file .. "' (an absolute path: the engine mounts it)", 3)
  end
  if c.ca_file and not c.api_url then
    error("backend 'docker': ca_file is set but api_url is not (the CA verifies api_url's certificate)", 3)
  end
  if c.network and not c.network:match("^[%w][%w_.%-]*$") then
    error("backend 'docker': bad network '" .. c.network .. "' (a Docker network name, e.g. host or bridge)", 3)
  end
  if c.ulimits then
    local err = Docker.check_ulimits(c.ulimits)
    if err then error("backend 'docker': bad ulimits: " .. err, 3) end
  end
end

-- ---- the Engine API ------------------------------------------------------------------

function Docker:socket()
  local env = os.getenv("DROVER_DOCKER_SOCKET")
  return self.config.socket or (env ~= "" and env) or "/var/run/docker.sock"
end

local function urlencode(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

--- "?k=v&..." from a table (keys sorted: stable URLs); tables become JSON.
local function query(q)
  if not q then return "" end
  local keys = {}
  for k in pairs(q) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local v = q[k]
    if type(v) == "table" then v = json.encode(v) end
    parts[#parts + 1] = k .. "=" .. urlencode(v)
  end
  return #parts > 0 and ("?" .. table.concat(parts, "&")) or ""
end

--- One API call.  opts: query, json, body, headers, on_chunk, timeout.
-- Raises a clear error when the engine cannot be reached; HTTP error
-- statuses are returned (see api_ok).
function Docker:api(method, path, opts)
  opts = opts or {}
  local sock = self:socket()
  local r, err = http.request {
    url = "http://docker" .. path .. query(opts.query), method = method, unix_socket = sock,
    json = opts.json, body = opts.body, headers = opts.headers, on_chunk = opts.on_chunk,
    timeout = opts.timeout == nil and (self.config.api_timeout or 120) or opts.timeout or nil,
  }
  if r then return r end
  local st = fs.stat(sock)
  if not st then
    error("docker: the Docker Engine is not running: no socket at " .. sock ..
      " (start dockerd, or set the 'socket' config key or DROVER_DOCKER_SOCKET)", 0)
  end
  if st.type ~= "socket" or tostring(err):find("onnect") then
    error("docker: the Docker Engine is not running: " .. sock .. " refuses connections (" ..
      one_line(err) .. ")", 0)
  end
  error("docker: " .. method .. " " .. path .. " on " .. sock .. " failed: " .. one_line(err), 0)
end

local function engine_message(r)
  if type(r.json) == "table" and r.json.message then return one_line(r.json.message) end
  return one_line(r.body)
end

--- api(), raising "WHAT: <engine's message>" on a status >= 400.
function Docker:api_ok(what, method, path, opts)
  local r = self:api(method, path, opts)
  if r.status >= 400 then
    error(what .. ": " .. engine_message(r) .. " (HTTP " .. r.status .. ")", 0)
  end
  return r
end

--- The config a deployment keeps: the caller's, plus the socket and the
-- base image as resolved here (from DROVER_DOCKER_SOCKET or
-- DROVER_DOCKER_BASE_IMAGE too), so that the daemon's reaper and `drover
-- status` in another environment ask the same engine -- the default socket
-- could be another engine, where every container is "gone".
function Docker:saved_config()
  local out = Local.saved_config(self) or {}
  out.socket = self:socket()
  local env = os.getenv("DROVER_DOCKER_BASE_IMAGE")
  if self.config.base_image or (env and env ~= "") then out.base_image = self:base_image() end
  return out
end

-- ---- package -----------------------------------------------------------------------

local function lua_dir()
  local init = package.searchpath("drover", package.path)
  local dir = init and init:match("^(.*)/drover/init%.lua$")
  if not dir then error("docker.package: cannot find drover's Lua library on package.path", 0) end
  return dir
end

local function backends_dir()
  local p = Docker.backend_path or debug.getinfo(1, "S").source:match("^@(.*)$")
  return fs.dirname(p)
end

function Docker:base_image()
  local env = os.getenv("DROVER_DOCKER_BASE_IMAGE")
  return self.config.base_image or (env and env ~= "" and env) or "drover-base:latest"
end

--- The build context's entries: Dockerfile, the bundle, drover (binary,
-- Lua library, the local and docker backends).  Sorted names, fixed mtime:
-- the same sources give the same bytes, hence the same package id.
-- extra: Dockerfile instructions appended (package's opts.dockerfile_lines).
function Docker:context_entries(bundle, extra)
  local ldir, bdir = lua_dir(), backends_dir()
  local lines = {
    "FROM " .. self:base_image(),
    "COPY drover/ " .. IMAGE_DROVER .. "/",
    "COPY bundle.tar " .. IMAGE_DROVER .. "/bundle.tar",
    "ENV DROVER_DAEMON=0",
    'CMD ["' .. IMAGE_DROVER .. '/bin/drover", "--version"]',
  }
  for _, l in ipairs(extra or {}) do lines[#lines + 1] = l end
  lines[#lines + 1] = ""
  local dockerfile = table.concat(lines, "\n")
  local entries = {
    { name = "Dockerfile", data = dockerfile },
    { name = "bundle.tar", path = bundle.location },
    { name = "drover/bin/drover", path = self:drover_bin(), mode = "755" },
  }
  for _, rel in ipairs(assert(fs.walk(ldir))) do
    if rel:match("%.lua$") or rel:match("^drover/dashboard/") then
      entries[#entries + 1] = { name = "drover/lua/" .. rel, path = ldir .. "/" .. rel }
    end
  end
  for _, b in ipairs { "local.lua", "docker.lua" } do
    entries[#entries + 1] = { name = "drover/backends/" .. b, path = bdir .. "/" .. b }
  end
  table.sort(entries, function(a, b) return a.name < b.name end)
  return entries
end

--- Docker repository names are lower case [a-z0-9._-].
local function repo_name(module)
  local s = module:lower():gsub("[^a-z0-9_.-]", "-"):gsub("^[^a-z0-9]+", "")
  return "drover/" .. (s ~= "" and s or "workflow")
end

--- Feed the build's JSON-lines output: print "stream" text as it comes,
-- keep the error and the image id.  Runs inside on_chunk (must not wait).
local function build_reader(out)
  local buf = ""
  return function(data)
    buf = buf .. data
    while true do
      local nl = buf:find("\n", 1, true)
      if not nl then break end
      local line = buf:sub(1, nl - 1)
      buf = buf:sub(nl + 1)
      if line:match("%S") then
        local msg = json.decode(line)
        if type(msg) == "table" then
          if type(msg.stream) == "string" then
            io.stderr:write(msg.stream); io.stderr:flush()
            out.log[#out.log + 1] = msg.stream
          end
          if msg.error then
            out.error = type(msg.errorDetail) == "table" and msg.errorDetail.message or msg.error
          end
          if type(msg.aux) == "table" and msg.aux.ID then out.image_id = msg.aux.ID end
        end
      end
    end
  end
end

function Docker:package(class_name, module, entrypoint, opts)
  opts = opts or {}
  local ok, bundle = pcall(Local.package, self, class_name, module, entrypoint, opts)
  if not ok then error((tostring(bundle):gsub("local%.package", "docker.package")), 2) end
  local store = self:store()
  local dir = store.home .. "/packages"
  local ctx = dir .. "/.ctx-" .. store_mod.new_id() .. ".tar"
  local extra = opts.dockerfile_lines
  if extra ~= nil then
    local okx = type(extra) == "table"
    for _, l in ipairs(okx and extra or {}) do okx = okx and type(l) == "string" and not l:find("\n") end
    if not okx then error("docker.package: bad option 'dockerfile_lines' (a list of one-line strings expected)", 2) end
  end
  local tok, terr = fs.tar(ctx, self:context_entries(bundle, extra))
  if not tok then error("docker.package: " .. tostring(terr), 2) end
  local id = fs.sha256(ctx)
  local tag = repo_name(module) .. ":" .. id:sub(1, 12)
  local body = assert(fs.read(ctx))
  fs.remove(ctx)
  local out = { log = {} }
  local r = self:api("POST", "/build", {
    query = { t = tag, rm = "1", forcerm = "1",
      labels = { ["drover.package"] = id, ["drover.module"] = module, ["drover.class"] = tostring(class_name),
        ["drover.bundle"] = bundle.id } },
    body = body, headers = { ["Content-Type"] = "application/x-tar" },
    on_chunk = build_reader(out), timeout = false,
  })
  if r.status >= 400 then
    error("docker.package: the build of " .. tag .. " failed: " .. engine_message(r), 2)
  end
  if out.error then error("docker.package: the build of " .. tag .. " failed: " .. one_line(out.error), 2) end
  local img = self:api_ok("docker.package: image " .. tag, "GET", "/images/" .. tag .. "/json").json
  local manifest = bundle.manifest
  manifest.docker = { image = tag, image_id = img.Id, base = self:base_image(), bundle = bundle.id }
  -- id: the image's build context; sha256: the digest of the file at
  -- `location` (the bundle), which a worker with --api downloads and checks
  local p = { id = id, sha256 = bundle.sha256, backend = "docker", class = class_name, module = module,
    entrypoint = bundle.entrypoint, location = bundle.location, manifest = manifest,
    image = tag, image_id = img.Id }
  store:put_package(p)
  return p
end

-- ---- deploy ------------------------------------------------------------------------

local MODES = { container = true, swarm = true }

--- "512m", "1g", 1048576 -> bytes.
local function memory_bytes(v)
  if math.type(v) == "integer" and v > 0 then return v end
  if type(v) == "string" then
    local n, unit = v:lower():match("^(%d+)([kmg]?)b?$")
    local mul = { [""] = 1, k = 1024, m = 1024 ^ 2, g = 1024 ^ 3 }
    if n then return math.tointeger(tonumber(n) * mul[unit]) end
  end
  error("docker.deploy: bad memory '" .. tostring(v) .. "' (bytes, or a string like \"512m\")", 0)
end

function Docker:image_exists(image)
  local r = self:api("GET", "/images/" .. image .. "/json")
  if r.status == 404 then return false end
  if r.status >= 400 then error("docker: image " .. image .. ": " .. engine_message(r), 0) end
  return true, r.json
end

function Docker:deploy(name, opts)
  opts = opts or {}
  if type(name) ~= "string" or not name:match("^[%w_%.%-]+$") then
    error("docker.deploy: bad deployment name '" .. tostring(name) .. "' (letters, digits, _ . - only)", 2)
  end
  local store = self:store()
  if not opts.package then error("docker.deploy: a package id is required (drover package prints one)", 2) end
  local p = store:package(opts.package)
  if not p then error("docker.deploy: unknown package '" .. tostring(opts.package) .. "'", 2) end
  local manifest = store_mod.decode(p.manifest) or {}
  local image = opts.image or (manifest.docker and manifest.docker.image)
  if type(image) ~= "string" then
    error("docker.deploy: package '" .. p.id .. "' has no image (build it with the docker backend)", 2)
  end
  local mode = opts.mode or self.config.mode or "container"
  if not MODES[mode] then error("docker.deploy: bad mode '" .. tostring(mode) .. "' (container or swarm)", 2) end
  if opts.command ~= nil then
    if type(opts.command) ~= "table" or #opts.command == 0 then
      error("docker.deploy: bad command (a list of strings expected)", 2)
    end
    for _, a in ipairs(opts.command) do
      if type(a) ~= "string" then error("docker.deploy: bad command (a list of strings expected)", 2) end
    end
  end
  if opts.env ~= nil and type(opts.env) ~= "table" then
    error("docker.deploy: bad env (a table of NAME = value expected)", 2)
  end
  for k, v in pairs(opts.env or {}) do
    if type(k) ~= "string" or not k:match("^[%a_][%w_]*$") or (type(v) ~= "string" and type(v) ~= "number") then
      error("docker.deploy: bad env entry '" .. tostring(k) .. "' (NAME = string expected)", 2)
    end
  end
  local memory = opts.memory ~= nil and memory_bytes(opts.memory) or nil
  if opts.cpus ~= nil and (type(opts.cpus) ~= "number" or opts.cpus <= 0) then
    error("docker.deploy: bad cpus '" .. tostring(opts.cpus) .. "' (a positive number expected)", 2)
  end
  if opts.schedule ~= nil then
    local ok_s, serr = require("drover.cron").parse(opts.schedule)
    if not ok_s then error("docker.deploy: " .. serr, 0) end
  end
  if opts.max_active ~= nil and (math.type(opts.max_active) ~= "integer" or opts.max_active < 1) then
    error("docker.deploy: bad max_active '" .. tostring(opts.max_active) .. "' (a positive integer expected)", 0)
  end
  if not self:image_exists(image) then
    error("docker.deploy: image '" .. image .. "' does not exist in the Docker Engine at " .. self:socket() ..
      " (build it with drover package --backend docker)", 2)
  end
  local config = { image = image, command = opts.command, env = opts.env, memory = memory, cpus = opts.cpus,
    mode = mode }
  local ok, err = store:put_deployment({ name = name, backend = "docker", package_id = p.id,
    params = opts.params, schedule = opts.schedule, max_active = opts.max_active, config = config,
    backend_config = self:saved_config() }, opts.replace)
  if not ok then error(err, 0) end
  return { name = name, package = p.id, image = image, mode = mode }
end

-- ---- run ---------------------------------------------------------------------------

--- The server a run's container reports to: api_url, or with "auto" the
-- daemon serving this store (`drover run` starts one; a backend only looks);
-- nil in the shared-store fallback.  Raises one line when "auto" has none.
function Docker:api_target()
  local u = self.config.api_url
  if not u then return nil end
  local ca = self.config.ca_file
  if ca then
    local f = io.open(ca, "rb")
    if not f then error("docker.run: ca_file '" .. ca .. "' cannot be read", 0) end
    f:close()
  end
  if u ~= "auto" then return (u:gsub("/+$", "")) end
  local url, why = self:daemon_url()
  if not url then
    error("docker.run: api_url is \"auto\": " .. tostring(why), 0)
  end
  return url
end

--- Where to watch a run: its page on the server it reports to, or on the
-- daemon serving the store (as local's), else the engine's own record of
-- the container or service.
function Docker:run_url(id, mode, api)
  local url = api and (api .. "/runs/" .. id)
  if not url and os.getenv("DROVER_DAEMON") ~= "0" then url = Local.run_url(self, id, (self:daemon_url())) end
  if url and not url:match("^file:") then return url end
  return "http+unix://" .. urlencode(self:socket()) ..
    (mode == "swarm" and "/services/" or "/containers/") .. "drover-" .. id .. "/json"
end

--- Does `url` name this host's loopback?  A container reaches that only
-- on the host's network.
local function loopback_url(url)
  local host = url:match("^https?://%[([^%]]+)%]") or url:match("^https?://([^/:?#]+)")
  return host == "localhost" or host == "::1" or (host and host:match("^127%.%d+%.%d+%.%d+$")) ~= nil
end

--- How run `id`'s container reaches the store or the server:
-- { cmd, env (a list of NAME=value), mounts (list of { source, target,
-- read_only }), network }.  With `api` (a URL): `drover worker --api`,
-- the run's token in the environment only (argv shows in ps on the host
-- and in `docker inspect`), the CA file the one mount.  Without: the
-- shared store, DROVER_HOME bind-mounted at the same path.
function Docker:worker_setup(store, id, cfg, api)
  local env, mounts, cmd = { "DROVER_RUN_ID=" .. id, "DROVER_DAEMON=0" }, {}
  local network = self.config.network
  if api then
    cmd = { IMAGE_DROVER .. "/bin/drover", "worker", id, "--api", api }
    env[#env + 1] = "DROVER_RUN_TOKEN=" .. require("drover.run_token").issue(store, id)
    local ca = self.config.ca_file -- api_target checked it
    if ca then
      mounts[1] = { source = ca, target = CA_PATH, read_only = true }
      env[#env + 1] = "DROVER_CA_FILE=" .. CA_PATH
    end
    if not network and loopback_url(api) then network = "host" end
  else
    cmd = { IMAGE_DROVER .. "/bin/drover", "worker", id }
    table.insert(env, 1, "DROVER_HOME=" .. store.home)
    mounts[1] = { source = store.home, target = store.home }
  end
  -- sanitizer builds: the worker in the container runs with the same options
  for _, k in ipairs { "ASAN_OPTIONS", "UBSAN_OPTIONS" } do
    local v = os.getenv(k)
    if v and v ~= "" then env[#env + 1] = k .. "=" .. v end
  end
  -- then the deployment's own
  local keys = {}
  for k in pairs(cfg.env or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do env[#env + 1] = k .. "=" .. tostring(cfg.env[k]) end
  return { cmd = cfg.command or cmd, env = env, mounts = mounts, network = network }
end

-- ---- rlimits ------------------------------------------------------------------------

--- The rlimits the Engine API knows (HostConfig.Ulimits names), with the
-- line of /proc/PID/limits that gives each.
local RLIMITS = { core = "Max core file size", cpu = "Max cpu time", data = "Max data size",
  fsize = "Max file size", locks = "Max file locks", memlock = "Max locked memory",
  msgqueue = "Max msgqueue size", nice = "Max nice priority", nofile = "Max open files",
  nproc = "Max processes", rss = "Max resident set", rtprio = "Max realtime priority",
  rttime = "Max realtime timeout", sigpending = "Max pending signals", stack = "Max stack size" }

--- The config's ulimits: nil when good, else why not (one line).
function Docker.check_ulimits(u)
  local names = {}
  for k in pairs(u) do names[#names + 1] = tostring(k) end
  table.sort(names)
  for _, k in ipairs(names) do
    local v = u[k]
    if not RLIMITS[k] then
      local known = {}
      for n in pairs(RLIMITS) do known[#known + 1] = n end
      table.sort(known)
      return "unknown rlimit '" .. k .. "' (one of " .. table.concat(known, ", ") .. ")"
    end
    local soft, hard = v, v
    if type(v) == "table" then soft, hard = v.soft, v.hard end
    for _, x in ipairs { soft, hard } do
      if math.type(x) ~= "integer" or x < 0 then
        return "'" .. k .. "' must be a non-negative integer or { soft = n, hard = n }"
      end
    end
    if soft > hard then return "'" .. k .. "': soft " .. soft .. " is above hard " .. hard end
  end
end

--- This process's hard limit of rlimit `name` (from /proc/self/limits);
-- nil when unlimited or unknown.
local function hard_limit(name)
  local text = fs.read("/proc/self/limits")
  if not text then return nil end
  local hard = text:match("\n" .. RLIMITS[name]:gsub(" ", "%%s") .. "%s+%S+%s+(%d+)")
  return hard and math.tointeger(tonumber(hard))
end

--- HostConfig.Ulimits of a container.  Podman, unlike dockerd, gives
-- containers rlimits of its own (nofile 1048576, nproc 4194304 when
-- rootful) rather than the engine's; on a host whose hard limits are lower
-- (and no CAP_SYS_RESOURCE) the runtime cannot set them and no container
-- starts.  So every container asks for nofile and nproc at this process's
-- hard limits -- on one host, the engine's too -- with nproc at most
-- kernel.pid_max: Podman lowers its own nproc to that at start (so its
-- runtime can set no more), and no more processes can exist anyway.  On
-- dockerd, running with the host's limits, nothing changes.  The config's
-- `ulimits` come on top (an engine on another host with lower limits).
function Docker:ulimits()
  local want = {}
  for _, name in ipairs { "nofile", "nproc" } do
    local hard = hard_limit(name)
    if name == "nproc" then
      local pid_max = math.tointeger(tonumber((fs.read("/proc/sys/kernel/pid_max") or ""):match("%d+") or ""))
      if pid_max and (not hard or pid_max < hard) then hard = pid_max end
    end
    if hard then want[name] = { hard, hard } end
  end
  for name, v in pairs(self.config.ulimits or {}) do
    want[name] = type(v) == "table" and { v.soft, v.hard } or { v, v }
  end
  local names = {}
  for name in pairs(want) do names[#names + 1] = name end
  table.sort(names)
  local out = {}
  for _, name in ipairs(names) do
    out[#out + 1] = { Name = name, Soft = want[name][1], Hard = want[name][2] }
  end
  return #out > 0 and out or nil
end

--- An engine's error starting a container, with what to do about the two
-- causes Podman's compatible API is known for.
local function start_hint(err)
  local e = tostring(err)
  if e:find("rlimit", 1, true) then
    return e .. " (the engine's hard limits are below the container's ulimits: set the 'ulimits' config key" ..
      " within them, see docs/docker.md)"
  end
  if e:find("catatonit", 1, true) or e:find("container%-init") then
    return e .. " (Init: true needs the engine's init binary: on Podman install catatonit, see docs/docker.md)"
  end
  return e
end

function Docker:start_container(id, cfg, w, labels)
  local binds
  for _, m in ipairs(w.mounts) do
    binds = binds or {}
    binds[#binds + 1] = m.source .. ":" .. m.target .. (m.read_only and ":ro" or "")
  end
  local host = { Binds = binds, Init = true, NetworkMode = w.network, Ulimits = self:ulimits() }
  if cfg.memory then host.Memory = cfg.memory end
  if cfg.cpus then host.NanoCpus = math.tointeger(math.floor(cfg.cpus * 1e9)) end
  local okc, r = pcall(self.api_ok, self, "docker.run: creating the container", "POST", "/containers/create", {
    query = { name = "drover-" .. id },
    json = { Image = cfg.image, Cmd = w.cmd, Env = w.env, Labels = labels, HostConfig = host,
      AttachStdout = false, AttachStderr = false, Tty = false },
  })
  if not okc then error(start_hint(r), 0) end
  local cid = r.json.Id
  local ok, err = pcall(self.api_ok, self, "docker.run: starting the container", "POST",
    "/containers/" .. cid .. "/start")
  if not ok then
    self:api("DELETE", "/containers/" .. cid, { query = { force = "1" } })
    error(start_hint(err), 0)
  end
  return cid
end

function Docker:start_service(id, cfg, w, labels)
  local mounts
  for _, m in ipairs(w.mounts) do
    mounts = mounts or {}
    mounts[#mounts + 1] = { Type = "bind", Source = m.source, Target = m.target, ReadOnly = m.read_only or nil }
  end
  local spec = {
    Name = "drover-" .. id, Labels = labels,
    TaskTemplate = {
      ContainerSpec = { Image = cfg.image, Command = w.cmd, Env = w.env, Labels = labels, Init = true,
        Mounts = mounts,
        StopGracePeriod = math.tointeger(math.floor((self.config.stop_timeout or 10) * 1e9)) },
      RestartPolicy = { Condition = "none" },
      Resources = { Limits = { MemoryBytes = cfg.memory,
        NanoCPUs = cfg.cpus and math.tointeger(math.floor(cfg.cpus * 1e9)) or nil } },
      Networks = w.network and { { Target = w.network } } or nil,
    },
    -- a job: one task that runs to completion, not a service kept running
    Mode = { ReplicatedJob = { MaxConcurrent = 1, TotalCompletions = 1 } },
  }
  -- No X-Registry-Auth header and an API version >= 1.30: the engine does
  -- not resolve the image in a registry (the CLI's --no-resolve-image).
  local r = self:api_ok("docker.run: creating the swarm service", "POST", "/services/create", { json = spec })
  return r.json.ID
end

--- Remove what start_container/start_service made (a run that could not
-- be recorded must not go on running unseen).
function Docker:remove_external(kind, eid)
  if kind == "service" then return self:api("DELETE", "/services/" .. eid) end
  return self:api("DELETE", "/containers/" .. eid, { query = { force = "1" } })
end

function Docker:run(name, params, opts)
  opts = opts or {}
  if params ~= nil and type(params) ~= "table" then
    error("docker.run: bad argument 'params' (table expected, got " .. type(params) .. ")", 2)
  end
  local store = self:store()
  local d = self:runnable_deployment(name)
  local cfg = store_mod.decode(d.config) or {}
  local merged = store_mod.decode(d.params) or {}
  for k, v in pairs(params or {}) do merged[k] = v end
  local id = store_mod.new_id()
  local mode = cfg.mode or "container"
  local kind = mode == "swarm" and "service" or "container"
  local api = self:api_target()
  local url = self:run_url(id, mode, api)
  store:create_flow_run { id = id, name = name, deployment = name, backend = "docker",
    state = states.PENDING, params = merged, source = opts.source or { kind = "deployment" },
    resumed_from = opts.resumed_from, url = url }
  -- From here on every failure ends the run CRASHED: a PENDING run with no
  -- container would otherwise wait forever (reconcile catches the rest:
  -- a submitter killed right here).
  local ext
  local ok, err = pcall(function()
    local labels = { drover = "1", [LABEL] = name, ["drover.run"] = id, ["drover.home"] = store.home }
    local w = self:worker_setup(store, id, cfg, api)
    local starter = mode == "swarm" and self.start_service or self.start_container
    ext = starter(self, id, cfg, w, labels)
    store:update_flow_run(id, { external_id = kind .. ":" .. ext })
  end)
  if not ok then
    if ext then pcall(self.remove_external, self, kind, ext) end
    store:end_flow_run(id, states.CRASHED, "did not start: " .. one_line(err))
    error(err, 0)
  end
  return id, url
end

-- resume(run_id) is local's: it calls self:run, this backend's.

-- ---- status: the store reconciled with the engine --------------------------------------

local function ext_id(r)
  local kind, id = tostring(r.external_id or ""):match("^(%a+):(.+)$")
  return kind, id
end

--- The newest task of swarm service `sid`; nil, true when the service is gone.
function Docker:service_task(sid)
  local resp = self:api("GET", "/tasks", { query = { filters = { service = { sid } } } })
  if resp.status == 404 or (resp.status < 400 and #resp.json == 0 and
      self:api("GET", "/services/" .. sid).status == 404) then
    return nil, true
  end
  if resp.status >= 400 or #resp.json == 0 then return nil end
  table.sort(resp.json, function(a, b) return (a.CreatedAt or "") < (b.CreatedAt or "") end)
  return resp.json[#resp.json]
end

--- Swarm task states from which a task never runs again.
local FINAL_TASK = { complete = true, failed = true, shutdown = true, rejected = true, orphaned = true,
  remove = true }

--- The liveness hook (see orchestrator.lua): is the run's container, or
-- its swarm job's task, still going?  true or false; nil when the engine
-- cannot be asked, or has no container or task for the run yet.
function Docker:is_alive(r)
  local kind, eid = ext_id(r)
  if not kind then return nil end
  local ok, alive = pcall(function()
    if kind == "container" then
      local resp = self:api("GET", "/containers/" .. eid .. "/json")
      if resp.status == 404 then return false end
      if resp.status >= 400 or type(resp.json) ~= "table" then return nil end
      local s = resp.json.State or {}
      return (s.Running or s.Status == "created" or s.Status == "restarting") and true or false
    end
    local t, gone = self:service_task(eid)
    if gone then return false end
    if not t then return nil end
    return not FINAL_TASK[(t.Status or {}).State]
  end)
  if ok then return alive end
  return nil
end

--- What the engine says about a run: { ended = bool, code = n, killed = bool, message = s }
-- or nil while it still runs.
function Docker:engine_state(r)
  local kind, eid = ext_id(r)
  if kind == "container" then
    local resp = self:api("GET", "/containers/" .. eid .. "/json")
    if resp.status == 404 then return { gone = true, message = "container " .. eid:sub(1, 12) .. " is gone" } end
    if resp.status >= 400 then return nil end
    local s = resp.json.State or {}
    if s.Running or s.Status == "created" or s.Status == "restarting" then return nil end
    return { code = s.ExitCode or -1, oom = s.OOMKilled, message = s.Error ~= "" and one_line(s.Error) or nil }
  elseif kind == "service" then
    local t, gone = self:service_task(eid)
    if gone then return { gone = true, message = "service " .. eid:sub(1, 12) .. " is gone" } end
    if not t then return nil end
    local st = t.Status or {}
    if not FINAL_TASK[st.State] then return nil end
    local cs = st.ContainerStatus or {}
    local code = cs.ExitCode or (st.State == "complete" and 0 or -1)
    return { code = code, message = (st.Err and st.Err ~= "") and (st.State .. ": " .. one_line(st.Err)) or nil,
      rejected = st.State == "rejected" }
  end
end

--- A run with no external_id: its submitter failed or was killed between
-- recording the run and recording its container.  The engine may still
-- have it under its name, drover-RUN_ID: adopt it.  Else, once it is older
-- than never_started_after, it never started: CRASHED.
function Docker:adopt(r)
  for _, kind in ipairs { "container", "service" } do
    local path = kind == "service" and ("/services/drover-" .. r.id) or ("/containers/drover-" .. r.id .. "/json")
    local resp = self:api("GET", path)
    local eid = resp.status == 200 and type(resp.json) == "table" and (resp.json.Id or resp.json.ID)
    if eid then
      self:store():update_flow_run(r.id, { external_id = kind .. ":" .. eid })
      return self:store():flow_run(r.id)
    end
    -- 503 on /services: not a swarm manager, so no services at all
    if resp.status >= 400 and resp.status ~= 404 and resp.status ~= 503 then
      error("docker: " .. path .. ": " .. engine_message(resp) .. " (HTTP " .. resp.status .. ")", 0)
    end
  end
  if r.state == states.PENDING and store_mod.time() - (r.created or 0) > self.never_started_after then
    self:store():end_flow_run(r.id, states.CRASHED,
      "never started: no container or service drover-" .. r.id .. " in the engine")
    return self:store():flow_run(r.id)
  end
  return r
end

--- A run the store still calls active whose container has ended without
-- the worker recording an end: FAILED with the exit code, CRASHED when it
-- was killed (signal, OOM) or vanished; a CANCELLING run becomes CANCELLED.
-- An engine that cannot be reached raises (Docker:api): nothing changes.
function Docker:reconcile(r)
  if not (r and states.active[r.state]) then return r end
  if not r.external_id then
    r = self:adopt(r)
    if not (states.active[r.state] and r.external_id) then return r end
  end
  local e = self:engine_state(r)
  if not e then return r end
  local store = self:store()
  local fresh = store:flow_run(r.id)
  if not states.active[fresh.state] then return fresh end -- the worker's own end came first
  local state, msg
  if fresh.state == states.CANCELLING then
    state, msg = states.CANCELLED, fresh.message or "cancelled" -- what the canceller asked
  elseif e.gone then
    state, msg = states.CRASHED, e.message
  elseif e.oom then
    state, msg = states.CRASHED, "container killed: out of memory (exit code " .. e.code .. ")"
  elseif e.code > 128 then
    state, msg = states.CRASHED, "container killed by signal " .. (e.code - 128) .. " (exit code " .. e.code .. ")"
  elseif e.code ~= 0 then
    state, msg = states.FAILED, "container exited with code " .. e.code .. (e.message and (": " .. e.message) or "")
  else
    state, msg = states.CRASHED, "container exited with code 0 without recording an end" ..
      (e.message and (": " .. e.message) or "")
  end
  store:end_flow_run(r.id, state, msg)
  return store:flow_run(r.id)
end

function Docker:status(run_id)
  local store = self:store()
  local r = self:find_run(run_id)
  r = self:reconcile(r)
  r.task_runs = store:task_runs(r.id)
  return r
end

function Docker:list(opts)
  local runs = self:store():flow_runs { backend = "docker", deployment = opts and opts.deployment, limit = 1000 }
  for i, r in ipairs(runs) do runs[i] = self:reconcile(r) end
  return runs
end

-- ---- logs ---------------------------------------------------------------------------

--- A demultiplexer for the engine's log stream: 8-byte headers (stream
-- type: 1 stdout, 2 stderr; 3 zero bytes; big-endian uint32 length), then
-- the payload.  Calls emit(stream, line) per complete line.
local function demuxer(emit)
  local buf, partial = "", { stdout = "", stderr = "" }
  local names = { [0] = "stdout", [1] = "stdout", [2] = "stderr" }
  local function feed(data)
    buf = buf .. data
    while #buf >= 8 do
      local kind, size = string.unpack(">BxxxI4", buf)
      if #buf < 8 + size then break end
      local stream = names[kind] or "stdout"
      local text = partial[stream] .. buf:sub(9, 8 + size)
      buf = buf:sub(9 + size)
      for line in text:gmatch("([^\n]*)\n") do emit(stream, line) end
      partial[stream] = text:match("([^\n]*)$")
    end
  end
  local function finish()
    for _, s in ipairs { "stdout", "stderr" } do
      if partial[s] ~= "" then emit(s, partial[s]); partial[s] = "" end
    end
  end
  return feed, finish
end
Docker.demuxer = demuxer

--- The engine's log lines of a run: list of { stream =, line = }.
-- opts.follow: keep reading until the container ends, calling
-- opts.on_line(line, stream) as lines arrive.  nil when the engine has no
-- container or service for the run any more.
function Docker:engine_logs(r, opts)
  opts = opts or {}
  local kind, eid = ext_id(r)
  if not kind then return nil end
  local entries = {}
  local feed, finish = demuxer(function(stream, line)
    entries[#entries + 1] = { stream = stream, line = line }
    if opts.on_line then opts.on_line(line, stream) end
  end)
  local path = "/containers/" .. eid .. "/logs"
  if kind == "service" then
    -- the task's container when it is on this node (the service's log
    -- stream lags behind a job that just ended), else the service's logs
    local t = self:service_task(eid)
    local cid = t and t.Status and t.Status.ContainerStatus and t.Status.ContainerStatus.ContainerID
    if cid and self:api("GET", "/containers/" .. cid .. "/json").status == 200 then
      path = "/containers/" .. cid .. "/logs"
    else
      path = "/services/" .. eid .. "/logs"
    end
  end
  local resp = self:api("GET", path, {
    query = { stdout = "1", stderr = "1", follow = opts.follow and "1" or nil },
    on_chunk = feed, timeout = opts.follow and false or nil,
  })
  if resp.status == 404 then return nil end
  if resp.status >= 400 then error("docker.logs: " .. engine_message(resp), 0) end
  finish()
  return entries
end

--- Log lines of a run: the engine's (stdout and stderr) while it keeps the
-- container or service, else the lines the worker recorded in the store.
-- opts.follow, opts.on_line as for engine_logs; opts.source = "store" reads
-- the store only.
function Docker:logs(run_id, opts)
  opts = opts or {}
  local store = self:store()
  local r = self:find_run(run_id)
  local lines = {}
  if opts.source ~= "store" then
    local entries = self:engine_logs(r, opts)
    if entries then
      for _, e in ipairs(entries) do lines[#lines + 1] = e.line end
      return lines
    end
  end
  for _, l in ipairs(store:logs(r.id, opts.after or 0)) do
    lines[#lines + 1] = l.line
    if opts.on_line then opts.on_line(l.line, l.stream) end
  end
  return lines
end

-- ---- stop and cancel -------------------------------------------------------------------

--- Everything the engine holds labelled `label` ("key=value"): containers
-- (swarm tasks' included: they carry the service's labels) and services.
-- Raises one line (prefixed `what`) when the engine cannot answer.
function Docker:find_labelled(label, what)
  local filters = { label = { label } }
  local cs = self:api_ok(what .. ": listing containers", "GET", "/containers/json",
    { query = { all = "1", filters = filters } }).json
  local svcs = {}
  local r = self:api("GET", "/services", { query = { filters = filters } })
  if r.status < 400 then svcs = r.json end -- 503: not a swarm manager, so no services
  return cs, svcs
end

--- Everything the engine holds for a deployment, found by label.
function Docker:find(name)
  return self:find_labelled(LABEL .. "=" .. name, "docker.stop")
end

--- Stop and remove `containers` and `services` (found by find_labelled
-- with `label`), whose runs the caller has already set CANCELLING.
-- Returns the first error (one line, prefixed `what`) or nil.
function Docker:halt(what, label, containers, services)
  local timeout = self.config.stop_timeout or 10
  -- Every container, swarm tasks included (the swarm, told to remove a job
  -- service, does not always stop a running task): SIGTERM (the worker
  -- cancels its flow and records CANCELLED), SIGKILL after the timeout; in
  -- parallel, each in its own task.
  local tasks = {}
  for _, c in ipairs(containers) do
    tasks[#tasks + 1] = drover.spawn(function()
      self:api("POST", "/containers/" .. c.Id .. "/stop", { query = { t = tostring(math.ceil(timeout)) },
        timeout = timeout + 60 })
    end)
  end
  local first_err
  for _, t in ipairs(tasks) do
    local ok, err = t:wait()
    if not ok and not first_err then first_err = err end
  end
  -- then the services (no restart: their tasks have ended) and the containers
  for _, s in ipairs(services) do
    local resp = self:api("DELETE", "/services/" .. s.ID)
    if resp.status >= 400 and resp.status ~= 404 and not first_err then
      first_err = what .. ": removing service " .. s.ID .. ": " .. engine_message(resp)
    end
  end
  for _, c in ipairs(containers) do
    local resp = self:api("DELETE", "/containers/" .. c.Id, { query = { force = "1" } })
    if resp.status >= 400 and resp.status ~= 404 and not first_err then
      first_err = what .. ": removing container " .. c.Id:sub(1, 12) .. ": " .. engine_message(resp)
    end
  end
  -- what a swarm task started meanwhile goes too
  local deadline = drover.now() + 60
  while drover.now() < deadline do
    local left = self:find_labelled(label, what)
    if #left == 0 then break end
    for _, c in ipairs(left) do self:api("DELETE", "/containers/" .. c.Id, { query = { force = "1" } }) end
    drover.sleep(0.2)
  end
  return first_err
end

function Docker:stop(name, _opts)
  local store = self:store()
  self:deployment_of(name)
  -- ask the engine first: if it cannot answer, nothing changes
  local label = LABEL .. "=" .. name
  local containers, services = self:find_labelled(label, "docker.stop")
  store:set_paused(name, true)
  local runs = store:flow_runs { deployment = name, active = true, limit = 100000 }
  for _, r in ipairs(runs) do store:set_flow_state(r.id, states.CANCELLING, "stop requested") end
  local first_err = self:halt("docker.stop", label, containers, services)
  local stopped = {}
  for _, r in ipairs(runs) do
    -- The worker records CANCELLED itself; if it could not, we do.
    store:end_flow_run(r.id, states.CANCELLED, "stopped")
    stopped[#stopped + 1] = r.id
  end
  if first_err then error(first_err, 0) end
  local left_c, left_s = self:find_labelled(label, "docker.stop")
  return { name = name, cancelled = stopped, removed = #containers + #services,
    left = #left_c + #left_s }
end

--- Cancel one active run, leaving its deployment active: CANCELLING at
-- once, then its container (swarm: its service and the task's container),
-- found by the label drover.run=ID, is stopped and removed as stop does;
-- CANCELLED once it has ended.  Returns the run's record.
function Docker:cancel(run_id)
  local store = self:store()
  -- reconcile first (it raises, changing nothing, when the engine is down):
  -- a run whose container already ended is not cancelled but reported
  local r = self:cancellable_run(run_id)
  local label = "drover.run=" .. r.id
  local containers, services = self:find_labelled(label, "docker.cancel")
  store:set_flow_state(r.id, states.CANCELLING, "cancel requested")
  local err = self:halt("docker.cancel", label, containers, services)
  -- The worker records CANCELLED itself; if it could not, we do.
  store:end_flow_run(r.id, states.CANCELLED, "cancelled")
  if err then error(err, 0) end
  return store:flow_run(r.id)
end

return Docker
