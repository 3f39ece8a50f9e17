--- The drover command line (everything after the C main's dispatch).
--
-- Each command is a function taking parsed options and returning an exit
-- code: 0 success, 1 the workflow failed, 2 usage or configuration error.
-- An error a command raises is printed as one line "drover: message" and
-- exits 2 when it is the caller's mistake (usage_error: bad arguments;
-- config_error: an unknown run, deployment or backend, a bad config), 1
-- otherwise (the operation failed at run time: a backend or a server
-- answered with an error).
local M = {}

local EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

local function usage_error(msg) error({ usage = true, message = msg }, 0) end
local function config_error(msg) error({ config = true, message = msg }, 0) end

-- What backends and the server refuse, in their own words (they raise
-- plain strings): a bad argument ("FUNC: bad WHAT ..."), an unknown name,
-- a request the store's state does not allow.  The caller's mistake, exit
-- 2, as a usage error; any other error is a failure at run time, exit 1.
-- A server's 4xx answer ends "(METHOD URL: 4NN)"; 401 is a token it
-- does not take.
local refusals = {
  "^[%w_]+%.[%w_]+: bad ",                -- local.deploy: bad schedule '61 * * * *': ...
  "^unknown %a+ '", "^[%w_]+%.[%w_]+: unknown %a+ '", -- unknown run 'x'; local.deploy: unknown package 'x'
  "^deployment '.-' already exists",
  "^deployment '.-' is stopped",
  ": only active runs can be cancelled$",
  "%(%u+ %S+: 4%d%d%)$",                  -- the server's 4xx
  "%(401[ )]",                            -- the server refused the token, or wants one
}

--- The exit code for the error a command raised.
local function exit_code_of(err)
  if type(err) == "table" then return (err.usage or err.config) and EXIT_USAGE or EXIT_FAILED end
  local msg = tostring(err):gsub("^[^\n]-%.lua:%d+: ", "") -- where it was raised: not the point
  for _, p in ipairs(refusals) do
    if msg:find(p) then return EXIT_USAGE end
  end
  return EXIT_FAILED
end

-- ---- argument parsing --------------------------------------------------------------

--- Parse argv against a spec { flags = {name = {short=, arg=bool, help=}}, positional = {...} }.
local function parse(cmd, spec, argv)
  local opts, pos = {}, {}
  local short = {}
  for name, f in pairs(spec.flags or {}) do if f.short then short[f.short] = name end end
  local i = 1
  while i <= #argv do
    local a = argv[i]
    local name, value
    if a == "--" then
      for j = i + 1, #argv do pos[#pos + 1] = argv[j] end
      break
    elseif a:sub(1, 2) == "--" then
      name, value = a:match("^%-%-([^=]+)=(.*)$")
      if not name then name = a:sub(3) end
    elseif a:sub(1, 1) == "-" and #a > 1 and not a:match("^%-%d") then
      name = short[a:sub(2)]
      if not name then usage_error("drover " .. cmd .. ": unknown option '" .. a .. "' (see drover " .. cmd .. " --help)") end
    end
    if name then
      local f = (spec.flags or {})[name]
      if name == "help" then opts.help = true
      elseif not f then
        usage_error("drover " .. cmd .. ": unknown option '--" .. name .. "' (see drover " .. cmd .. " --help)")
      elseif f.arg then
        if value == nil then
          i = i + 1
          value = argv[i]
          if value == nil then usage_error("drover " .. cmd .. ": option '--" .. name .. "' needs a value") end
        end
        if f.multi then
          opts[name] = opts[name] or {}
          table.insert(opts[name], value)
        else
          opts[name] = value
        end
      else
        opts[name] = true
      end
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

--- key=value parameters; values that parse as JSON are taken as JSON.
function M.parse_params(list, into)
  local json = require "drover.json"
  local params = into or {}
  for _, kv in ipairs(list) do
    local k, v = kv:match("^([%a_][%w_%.%-]*)=(.*)$")
    if not k then usage_error("bad parameter '" .. kv .. "': expected key=value") end
    local decoded = json.decode(v)
    if decoded ~= nil and v:match("^[%[{%d%-tfn\"]") then params[k] = decoded else params[k] = v end
  end
  return params
end

local function params_from(opts, pos)
  local json = require "drover.json"
  local params = {}
  if opts.params then
    local p, err = json.decode(opts.params)
    if type(p) ~= "table" then
      usage_error("bad --params: " .. (err or "expected a JSON object"))
    end
    params = p
  end
  return M.parse_params(pos, params)
end

-- ---- output -----------------------------------------------------------------------------

local function out_json(v)
  local json = require "drover.json"
  io.stdout:write(json.encode(v, { bytes = true }), "\n") -- bytes that are not UTF-8: {"$bytes": BASE64}
end

local function fmt_time(t)
  if not t then return "-" end
  return os.date("%Y-%m-%d %H:%M:%S", math.floor(t))
end

local function fmt_duration(a, b)
  if not a then return "-" end
  local d = (b or require("drover.store").time()) - a
  if d < 1 then return string.format("%.0fms", d * 1000) end
  if d < 120 then return string.format("%.1fs", d) end
  return string.format("%dm%02ds", d // 60, math.floor(d % 60))
end

--- Print rows as an aligned table with the given columns.
local function print_table(rows, cols)
  local widths = {}
  for i, c in ipairs(cols) do widths[i] = #c[1] end
  local cells = {}
  for r, row in ipairs(rows) do
    cells[r] = {}
    for i, c in ipairs(cols) do
      local v = c[2](row)
      v = v == nil and "-" or tostring(v)
      cells[r][i] = v
      if #v > widths[i] then widths[i] = #v end
    end
  end
  local function line(vals)
    local parts = {}
    for i, v in ipairs(vals) do parts[i] = v .. string.rep(" ", widths[i] - #v) end
    io.stdout:write((table.concat(parts, "  "):gsub("%s+$", "")), "\n")
  end
  local head = {}
  for i, c in ipairs(cols) do head[i] = c[1]:upper() end
  line(head)
  for _, r in ipairs(cells) do line(r) end
end

-- ---- shared helpers ----------------------------------------------------------------------

local function open_store(opts)
  local store_mod = require "drover.store"
  local s, err = store_mod.open(opts and opts.home, opts and opts.store and { store = opts.store })
  if not s then config_error(err) end -- DROVER_HOME names no usable store
  return s
end

--- The remote server the client commands work against (--api URL or
-- DROVER_API; its token from DROVER_TOKEN or DROVER_TOKEN_FILE), or nil:
-- then they open the store under DROVER_HOME.  See lua/drover/remote.lua.
local function remote_of(opts)
  if opts.token then
    usage_error("--token is not taken on the command line (ps shows it to every user): " ..
      "set DROVER_TOKEN or DROVER_TOKEN_FILE")
  end
  local url = opts.api or os.getenv("DROVER_API")
  if url == nil or url == "" then return nil end
  local api_client = require "drover.api_client"
  local ok, r = pcall(function()
    return require("drover.remote").new { url = url, token = api_client.token_from_env("DROVER_TOKEN"),
      ca_file = opts["ca-file"] or os.getenv("DROVER_CA_FILE") }
  end)
  if not ok then usage_error((tostring(r):gsub("^drover: ", ""))) end
  return r
end

--- The remote server, or the local store: what the client commands read.
local function open_source(opts)
  return remote_of(opts) or open_store()
end

local function find_run(store, id)
  local r = store:find_flow_run(id)
  if not r then config_error("unknown run '" .. tostring(id) .. "'") end
  return r
end

local function load_config(opts)
  local cfg = {}
  if opts.config then
    local json = require "drover.json"
    local fs = require "drover.fs"
    local text, err = fs.read(opts.config)
    if not text then usage_error("cannot read config file: " .. tostring(err)) end
    local c, jerr
    if opts.config:match("%.lua$") then
      local chunk, lerr = load(text, "@" .. opts.config, "t", {})
      if not chunk then usage_error("bad config file: " .. lerr) end
      c = chunk()
    else
      c, jerr = json.decode(text)
    end
    if type(c) ~= "table" then usage_error("bad config file " .. opts.config .. ": " .. (jerr or "expected an object")) end
    cfg = c
  end
  for _, kv in ipairs(opts.set or {}) do
    M.parse_params({ kv }, cfg)
  end
  return cfg
end

--- Load a backend through `fn(...)`.  The loader raises with a position
-- (for Lua callers); the CLI shows one plain line (usage errors, tables,
-- pass through as they are).  Not found, not compiling, a config it
-- refuses: configuration errors.
local function load_backend(fn, ...)
  local ok, o = pcall(fn, ...)
  if not ok then
    if type(o) == "table" then error(o, 0) end
    config_error(tostring(o))
  end
  return o
end

local function orchestrator_for(opts, backend)
  local remote = remote_of(opts)
  if remote then return remote:backend(backend or opts.backend or "local", load_config(opts)) end
  return load_backend(require("drover").orchestrator, backend or opts.backend or "local", load_config(opts))
end

--- Deployment NAME's backend, configured as it was deployed (the config the
-- deployment kept) with the command's -c/--set on top.
local function deployment_orchestrator(opts, store, name)
  if store.remote then return store:deployment_backend(name, load_config(opts)) end
  local d = store:deployment(name)
  if not d then config_error("unknown deployment '" .. tostring(name) .. "'") end
  return load_backend(require("drover.orchestrator").for_deployment, d, load_config(opts), store.home)
end

--- The backend of a flow run (its deployment's, configured as deployed).
local function run_orchestrator(opts, store, run)
  if store.remote then return store:run_backend(run, load_config(opts)) end
  local o = load_backend(require("drover.orchestrator").for_run, store, run, load_config(opts))
  -- the command's store when the backend's is the same: not a second
  -- connection opened (and its schema checked) for one command
  if rawget(o, "_store") == nil and o.config.home == store.home then o._store = store end
  return o
end

-- ---- commands -------------------------------------------------------------------------------

local commands = {}
local order = {}
local function command(name, summary, spec, fn)
  commands[name] = { summary = summary, spec = spec, fn = fn }
  order[#order + 1] = name
end

local json_flag = { help = "print JSON instead of a table" }
--- The client commands' flags for a remote server, added to `flags`.
local function with_remote(flags)
  flags.api = { arg = true, help = "work against the drover server at URL (default: $DROVER_API); "
    .. "its token comes from $DROVER_TOKEN or the file $DROVER_TOKEN_FILE names" }
  flags["ca-file"] = { arg = true, help = "CA bundle to verify the server's TLS certificate (default: $DROVER_CA_FILE)" }
  flags.token = { arg = true, help = "refused: use $DROVER_TOKEN or $DROVER_TOKEN_FILE (ps shows the command line)" }
  return flags
end
local backend_flags = {
  backend = { short = "b", arg = true, help = "backend name (default: local)" },
  config = { short = "c", arg = true, help = "backend config file (JSON, or Lua returning a table)" },
  set = { arg = true, multi = true, help = "backend config key=value (repeatable)" },
  json = json_flag,
}

command("exec", "run a workflow script now as one tracked flow run", {
  args = "FILE.lua [key=value ...]",
  flags = { json = json_flag, params = { arg = true, help = "parameters as a JSON object" },
    name = { arg = true, help = "flow run name (default: the file name)" } },
}, function(opts, pos)
  local file = table.remove(pos, 1)
  if not file then usage_error("drover exec: missing FILE.lua") end
  local params = params_from(opts, pos)
  return M.exec_file(file, params, { json = opts.json, name = opts.name })
end)

local real_exit = os.exit

--- The exec process runs flow run `flow` itself: record its pid and start
-- time, so that the reaper ends the run CRASHED if the process dies
-- unrecorded (SIGKILL) and a cancel from elsewhere (drover cancel, the
-- dashboard: Local:interrupt) reaches it as SIGTERM; and record the run's
-- end before an os.exit in the workflow ends the process.  `report(run)`
-- prints the end.
local function exec_process_started(flow, o, report)
  local drover = require "drover"
  o.flow = flow
  local identity = require "drover.process_identity"
  flow.store:update_flow_run(flow.id, { pid = drover.pid(), host = identity.host(),
    external_id = identity.tag(drover.pid()) })
  os.exit = function(code, close) -- luacheck: ignore 122 (the workflow's os.exit, for this run)
    os.exit = real_exit -- luacheck: ignore 122
    flow:exiting(code)
    report { id = flow.id, state = flow.final_state, message = flow.final_message }
    io.stdout:flush()
    return real_exit(code, close)
  end
end

--- Run a workflow file as a tracked flow run: shared by exec and resume,
-- and with drover_exec (drover.api.exec_file is the one path).
function M.exec_file(file, params, o)
  local drover = require "drover"
  local tracker = require "drover.tracker"
  local sigint, sigterm, report
  local function started(flow)
    if not o.json then io.stderr:write("drover: flow run ", flow.id, " started (", flow.name, ")\n") end
    -- Live progress on a terminal: a line per task run as it starts and ends.
    if not o.json and drover.isatty(2) then
      local store_mod = require "drover.store"
      local marks = { start = "\27[36m>\27[0m", done = "\27[32mv\27[0m", failed = "\27[31mx\27[0m",
        retry = "\27[33m~\27[0m", cancelled = "\27[33m-\27[0m", reused = "\27[32m=\27[0m" }
      tracker.observer = function(event, run, detail)
        local line = string.format("  %s %s", marks[event] or event, run.name)
        if event == "done" or event == "failed" then
          line = line .. string.format(" (%s)", fmt_duration(run.started, store_mod.time()))
        end
        if event == "retry" then
          line = line .. string.format(" attempt %d failed, retry %d/%d in %.3gs: %s", detail.attempt,
            detail.attempt, detail.retries, detail.delay, detail.error)
        elseif event == "failed" then
          line = line .. ": " .. detail.error
        elseif event == "reused" then
          line = line .. " (" .. detail.message .. ")"
        end
        io.stderr:write(line, "\n")
      end
    end
    local interrupts = 0
    local function on_interrupt(sig)
      interrupts = interrupts + 1
      if interrupts > 1 then
        io.stderr:write("drover: interrupted again, exiting now\n")
        real_exit(130, false)
      end
      io.stderr:write("drover: cancelling flow run ", flow.id, " (interrupt again to exit now)\n")
      local why = sig == 15 and "terminated" or "interrupted"
      -- a cancel from elsewhere (drover cancel, the dashboard) marks the
      -- run CANCELLING before its TERM
      local read, row = pcall(flow.store.flow_run, flow.store, flow.id)
      if sig == 15 and read and row and row.state == "CANCELLING" then why = "cancelled" end
      flow:cancel(why)
    end
    sigint = drover.on_signal("INT", on_interrupt)
    sigterm = drover.on_signal("TERM", on_interrupt)
    exec_process_started(flow, o, report)
  end
  local t0 = drover.now()
  function report(run, value)
    if o.json then
      out_json { id = run.id, state = run.state, message = run.message, result = run.result,
        duration = drover.now() - t0 }
    else
      io.stderr:write(string.format("drover: flow run %s %s in %s%s\n", run.id, run.state,
        fmt_duration(0, drover.now() - t0), run.message and (": " .. run.message) or ""))
      if value ~= nil then io.stderr:write(tostring(value), "\n") end
    end
  end
  local done, run, ok, value = pcall(require("drover.api").exec_file, file, params,
    { name = o.name, resumed_from = o.resumed_from, started = started })
  os.exit = real_exit -- luacheck: ignore 122 (restored: the workflow's os.exit is over)
  if sigint then sigint:stop() end
  if sigterm then sigterm:stop() end
  tracker.observer = nil
  local flow = o.flow
  if flow and flow.store_failed then
    -- the store would not take the run's writes (disk full): one line, from
    -- what this process knows, whatever the store now says
    report { id = flow.id, state = flow.final_state, message = flow.final_message ..
      (flow.end_recorded and "" or "; its end could not be recorded either (drover status shows it CRASHED)") }
    return EXIT_FAILED
  end
  if not done then error(run, 0) end
  if not run then
    if value then usage_error(ok) end -- the file is not there: "cannot open FILE"
    error(ok, 0) -- FILE:LINE: message, a workflow that does not compile
  end
  report(run, not ok and run.state == "FAILED" and value or nil)
  return run.state == "COMPLETED" and EXIT_OK or EXIT_FAILED
end

--- Before `drover run` and `drover resume` start a worker: a daemon
-- serves the store (started here, detached, if none runs: `drover serve
-- --port 0 --auto`), so that the worker reports to it and the run's URL is
-- its dashboard.  Not with DROVER_DAEMON=0, nor against a remote server.
-- A daemon that does not start in time leaves the backend's direct mode
-- (the worker writes the store; the run's log says why).  Backends only
-- look for the daemon (BaseOrchestrator:daemon_url): starting one is the
-- CLI's part.
local function ensure_daemon(store)
  if store.remote or os.getenv("DROVER_DAEMON") == "0" then return end
  local drover = require "drover"
  local runs = require "drover.orchestrator.runs"
  local home = store.home
  if runs.daemon_serving(home) then return end
  local p = drover.proc.spawn({ runs.drover_bin(), "serve", "--port", "0", "--auto" }, {
    detach = true, stdin = "", stdout = home .. "/daemon.log", stderr = home .. "/daemon.log",
    env = { DROVER_HOME = home },
  })
  if not p then return end
  local deadline = drover.now() + (tonumber(os.getenv("DROVER_DAEMON_TIMEOUT") or "") or 10)
  while not runs.daemon_serving(home) and drover.now() < deadline and p:is_running() do drover.sleep(0.02) end
end

command("resume", "rerun a FAILED or CRASHED flow run, reusing its COMPLETED task runs", {
  args = "RUN_ID", flags = { json = json_flag },
}, function(opts, pos)
  local id = pos[1] or usage_error("drover resume: missing RUN_ID")
  local store = open_store()
  local run = find_run(store, id)
  if run.state ~= "FAILED" and run.state ~= "CRASHED" then
    usage_error("run " .. run.id .. " is " .. run.state .. ": only FAILED or CRASHED runs can be resumed")
  end
  local store_mod = require "drover.store"
  local source = store_mod.decode(run.source) or {}
  if source.kind == "exec" then
    return M.exec_file(source.file, source.params or {}, { json = opts.json, name = run.name, resumed_from = run.id })
  end
  if not run.deployment then error("run " .. run.id .. " has no deployment and no source to rerun", 0) end
  local o = run_orchestrator({}, store, run)
  if type(o.resume) ~= "function" then error("backend '" .. run.backend .. "' does not implement resume", 0) end
  ensure_daemon(store)
  local new_id, url = o:resume(run.id)
  if opts.json then out_json { id = new_id, url = url, resumed_from = run.id }
  else print(new_id, url) end
  return EXIT_OK
end)

command("package", "build something the backend can run", {
  args = "--class C --module M --entrypoint E",
  flags = with_remote { backend = backend_flags.backend, config = backend_flags.config, set = backend_flags.set,
    json = json_flag, class = { arg = true, help = "workflow class name" },
    module = { arg = true, help = "Lua module (as for require) holding the class" },
    entrypoint = { arg = true, help = "method to call" },
    path = { arg = true, help = "project directory the module is found in (default: .)" } },
}, function(opts)
  if not opts.module then usage_error("drover package: --module is required") end
  local o = orchestrator_for(opts)
  local p = o:package(opts.class, opts.module, opts.entrypoint, { path = opts.path })
  if opts.json then out_json(p) else print(p.id, p.location or "") end
  return EXIT_OK
end)

command("deploy", "register a deployment so the backend can run it", {
  args = "NAME --package ID [key=value default params ...]",
  flags = with_remote { backend = backend_flags.backend, config = backend_flags.config, set = backend_flags.set,
    json = json_flag, package = { arg = true, help = "package id (from drover package)" },
    schedule = { arg = true, help = "cron ('*/5 * * * *') or interval ('@every 30s', '@hourly'); fired by drover serve" },
    ["max-active"] = { arg = true, help = "at most N active runs" },
    replace = { help = "replace an existing deployment of that name" },
    params = { arg = true, help = "default parameters as a JSON object" } },
}, function(opts, pos)
  local name = table.remove(pos, 1) or usage_error("drover deploy: missing NAME")
  local o = orchestrator_for(opts)
  local max_active = opts["max-active"] and tonumber(opts["max-active"])
  if opts["max-active"] and not max_active then usage_error("drover deploy: --max-active must be a number") end
  local d = o:deploy(name, { package = opts.package, params = params_from(opts, pos), schedule = opts.schedule,
    max_active = max_active, replace = opts.replace })
  if opts.json then out_json(d or { name = name }) else print(name) end
  return EXIT_OK
end)

command("run", "start a run of a deployment; prints its id and URL", {
  args = "DEPLOYMENT [key=value ...]",
  flags = with_remote { json = json_flag, params = { arg = true, help = "parameters as a JSON object" },
    config = backend_flags.config, set = backend_flags.set },
}, function(opts, pos)
  local name = table.remove(pos, 1) or usage_error("drover run: missing DEPLOYMENT")
  local params = params_from(opts, pos)
  local store = open_source(opts)
  local o = deployment_orchestrator(opts, store, name)
  ensure_daemon(store)
  local id, url = o:run(name, params)
  if opts.json then out_json { id = id, url = url } else print(id, url) end
  return EXIT_OK
end)

command("stop", "stop a deployment: cancel its active runs, pause it", {
  args = "DEPLOYMENT", flags = with_remote { json = json_flag, config = backend_flags.config, set = backend_flags.set },
}, function(opts, pos)
  local name = pos[1] or usage_error("drover stop: missing DEPLOYMENT")
  local o = deployment_orchestrator(opts, open_source(opts), name)
  local r = o:stop(name, {})
  if opts.json then out_json(r or { name = name }) else print("stopped " .. name) end
  return EXIT_OK
end)

command("cancel", "cancel one run (two-phase); its deployment stays active", {
  args = "RUN_ID", flags = with_remote { json = json_flag, config = backend_flags.config, set = backend_flags.set },
}, function(opts, pos)
  local id = pos[1] or usage_error("drover cancel: missing RUN_ID")
  local store = open_source(opts)
  local run = find_run(store, id)
  local r = run_orchestrator(opts, store, run):cancel(run.id)
  if opts.json then out_json(r) else print("cancelled " .. run.id .. " (" .. tostring(r and r.state) .. ")") end
  return EXIT_OK
end)

-- `drover status` lists a run's task runs one by one up to this many; a
-- bigger run is shown grouped by task name (as its dashboard page and
-- /api/runs/ID are), with the task runs that did not complete listed.
M.STATUS_TASK_RUNS = 100

--- "COMPLETED 19990  FAILED 10": a group's counts, in states' order.
local function fmt_counts(counts)
  local out = {}
  for _, st in ipairs(require("drover.states").all) do
    if counts[st] then out[#out + 1] = st .. " " .. counts[st] end
  end
  return table.concat(out, "  ")
end

--- The columns of a list of task runs, the name shown by name_of(t).
local function task_run_columns(name_of)
  return {
    { "task run", function(t) return t.id end },
    { "name", name_of },
    { "kind", function(t) return t.kind end },
    { "state", function(t) return t.state end },
    { "attempts", function(t) return t.attempts end },
    { "duration", function(t) return fmt_duration(t.started, t.ended) end },
    { "note", function(t) return t.message end },
  }
end

--- A big run's task runs: one line per name, then those that did not
-- complete (at most M.STATUS_TASK_RUNS of them).
local function print_task_groups(run, tasks)
  local summary = require("drover.store").summarize(tasks)
  print(string.format("%d task runs: %s", summary.total, fmt_counts(summary.counts)))
  print("")
  print_table(summary.groups, {
    { "name", function(g) return g.name end },
    { "task runs", function(g) return g.total end },
    { "states", function(g) return fmt_counts(g.counts) end },
    { "first started", function(g) return fmt_time(g.started) end },
    { "duration", function(g) return fmt_duration(g.started, g.ended) end },
  })
  local odd = {}
  for _, t in ipairs(tasks) do
    if t.state ~= "COMPLETED" then odd[#odd + 1] = t end
  end
  if #odd > 0 then
    local shown = math.min(#odd, M.STATUS_TASK_RUNS)
    print("")
    print(string.format("task runs that did not complete (%d%s):", #odd,
      shown < #odd and ", the first " .. shown or ""))
    print_table(table.move(odd, 1, shown, 1, {}), task_run_columns(function(t) return t.name end))
  end
  print("")
  print("(every task run: drover status " .. run.id .. " --all, or --json)")
end

command("status", "show a run and its task runs", {
  args = "RUN_ID", flags = with_remote { json = json_flag, config = backend_flags.config, set = backend_flags.set,
    all = { help = "list every task run, however many (a run of more than " .. M.STATUS_TASK_RUNS ..
      " is otherwise shown grouped by task name)" } },
}, function(opts, pos)
  local id = pos[1] or usage_error("drover status: missing RUN_ID")
  local store = open_source(opts)
  local run = find_run(store, id)
  -- Ask the run's backend: it reconciles the store with what really runs
  -- (a dead worker, a job Slurm ended, a container killed from outside).
  -- If the backend cannot answer, show the store's record, say why, and
  -- exit 1: the state shown may be stale.
  local code = EXIT_OK
  local ok, fresh = pcall(function() return run_orchestrator(opts, store, run):status(run.id) end)
  if ok and type(fresh) == "table" then
    run = fresh
  else
    io.stderr:write("drover status: backend '", run.backend, "' could not be asked (",
      type(fresh) == "table" and tostring(fresh.message or fresh[1]) or tostring(fresh),
      "); showing the stored record\n")
    code = EXIT_FAILED
  end
  local tasks = run.task_runs or store:task_runs(run.id)
  if opts.json then
    run.task_runs = tasks
    out_json(run)
    return code
  end
  print(string.format("run %s  %s  %s", run.id, run.name, run.state))
  print(string.format("  deployment %s  backend %s  started %s  duration %s", run.deployment or "-",
    run.backend, fmt_time(run.started or run.created), fmt_duration(run.started, run.ended)))
  if run.message then print("  message: " .. run.message) end
  if run.resumed_from then print("  resumed from " .. run.resumed_from) end
  if #tasks > M.STATUS_TASK_RUNS and not opts.all then
    print("")
    print_task_groups(run, tasks)
  elseif #tasks > 0 then
    print("")
    local depth = {}
    for _, t in ipairs(tasks) do depth[t.id] = t.parent_id and ((depth[t.parent_id] or 0) + 1) or 0 end
    print_table(tasks, task_run_columns(function(t) return string.rep("  ", depth[t.id]) .. t.name end))
  end
  return code
end)

command("logs", "print a run's log lines", {
  args = "RUN_ID", flags = with_remote { json = json_flag,
    follow = { short = "f", help = "keep printing new lines until the run ends" } },
}, function(opts, pos)
  local id = pos[1] or usage_error("drover logs: missing RUN_ID")
  local store = open_source(opts)
  local run = find_run(store, id)
  local states = require "drover.states"
  local drover = require "drover"
  local last = 0
  repeat
    local rows = store:logs(run.id, last)
    for _, l in ipairs(rows) do
      last = l.id
      if opts.json then out_json(l) else io.stdout:write(l.line, "\n") end
    end
    io.stdout:flush()
    if not opts.follow then break end
    run = store:flow_run(run.id)
    if states.is_final(run.state) and #rows == 0 then break end
    drover.sleep(0.2)
  until false
  return EXIT_OK
end)

command("ls", "list runs (or deployments with --deployments)", {
  args = "", flags = with_remote { json = json_flag,
    deployment = { short = "d", arg = true, help = "only runs of this deployment" },
    state = { short = "s", arg = true, help = "only runs in this state" },
    limit = { short = "n", arg = true, help = "at most N runs (default 50)" },
    deployments = { help = "list deployments instead of runs" } },
}, function(opts)
  local store = open_source(opts)
  if opts.deployments then
    local ds = store:deployments()
    if opts.json then out_json(ds) return EXIT_OK end
    print_table(ds, {
      { "name", function(d) return d.name end }, { "backend", function(d) return d.backend end },
      { "package", function(d) return d.package_id and d.package_id:sub(1, 12) end },
      { "schedule", function(d) return d.schedule end },
      { "paused", function(d) return d.paused == 1 and "yes" or "no" end },
    })
    return EXIT_OK
  end
  local states = require "drover.states"
  if opts.state and not states[opts.state:upper()] then usage_error("drover ls: unknown state '" .. opts.state .. "'") end
  local runs = store:flow_runs { deployment = opts.deployment, state = opts.state and opts.state:upper(),
    limit = tonumber(opts.limit) or 50 }
  -- a local run whose process died unrecorded (a killed drover exec) is
  -- shown, and stored, as CRASHED
  local reaper
  for i, r in ipairs(store.remote and {} or runs) do
    if r.backend == "local" and r.pid and states.active[r.state] then
      reaper = reaper or load_backend(require("drover").orchestrator, "local", { home = store.home })
      runs[i] = reaper:reap(r)
    end
  end
  if opts.json then out_json(runs) return EXIT_OK end
  print_table(runs, {
    { "run", function(r) return r.id end }, { "name", function(r) return r.name end },
    { "deployment", function(r) return r.deployment end }, { "state", function(r) return r.state end },
    { "started", function(r) return fmt_time(r.started or r.created) end },
    { "duration", function(r) return fmt_duration(r.started, r.ended) end },
  })
  return EXIT_OK
end)

command("prune", "delete ended runs older than a cutoff, with their task runs and logs", {
  args = "--older-than AGE [--state S ...] [--deployment D] [--dry-run]",
  flags = { ["older-than"] = { arg = true, help = "runs created and ended more than AGE ago (30d, 12h, 90m, 45s, 2w)" },
    state = { short = "s", arg = true, multi = true, help = "only runs in this final state (repeatable)" },
    deployment = { short = "d", arg = true, help = "only runs of this deployment" },
    ["dry-run"] = { help = "count what would be deleted; delete nothing" },
    ["full-vacuum"] = { help = "rewrite a store made before incremental vacuum once (VACUUM: holds the write lock)" },
    json = json_flag },
}, function(opts)
  local retention = require "drover.retention"
  local states = require "drover.states"
  if not opts["older-than"] then usage_error("drover prune: missing --older-than AGE (for example 30d)") end
  local age, aerr = retention.parse_duration(opts["older-than"])
  if not age then usage_error("drover prune: --older-than " .. aerr) end
  local wanted
  for _, s in ipairs(opts.state or {}) do
    local st = s:upper()
    if not states[st] then usage_error("drover prune: unknown state '" .. s .. "'") end
    if not states.is_final(st) then
      usage_error("drover prune: --state " .. st .. " is an active state; only ended runs are pruned")
    end
    wanted = wanted or {}
    wanted[#wanted + 1] = st
  end
  if wanted then table.sort(wanted) end
  local store = open_store()
  local store_mod = require "drover.store"
  local filter = { before = store_mod.time() - age, states = wanted, deployment = opts.deployment }
  local size_before = store:disk_size()
  local r
  if opts["dry-run"] then
    r = store:prune_count(filter)
  else
    r = retention.pass(store, filter, { checkpoint = "TRUNCATE" })
    if opts["full-vacuum"] then r.full_vacuum = store:use_incremental_vacuum() end
    store:checkpoint("TRUNCATE")
  end
  r.dry_run = opts["dry-run"] == true
  r.older_than, r.before = age, filter.before
  r.size_before, r.size_after = size_before, store:disk_size()
  r.incremental_vacuum = store:incremental_vacuum()
  store:close()
  if opts.json then out_json(r) return EXIT_OK end
  local mb = function(b) return string.format("%.1f MB", b / 1e6) end
  print(string.format("%s %d run(s): %d task run(s), %d log line(s), %d state(s), %d call(s)",
    r.dry_run and "would prune" or "pruned", r.runs, r.task_runs, r.logs, r.states, r.calls))
  if not r.dry_run then
    print(string.format("  %d batch(es) in %.2f s (median %.0f ms, longest %.0f ms); store %s -> %s", r.batches,
      r.seconds, r.median_batch_seconds * 1000, r.max_batch_seconds * 1000, mb(r.size_before), mb(r.size_after)))
    if r.vacuumed > 0 then
      print(string.format("  %d free page(s) given back in %.2f s (median step %.0f ms, longest %.0f ms)", r.vacuumed,
        r.vacuum_seconds, r.median_vacuum_step_seconds * 1000, r.max_vacuum_step_seconds * 1000))
    end
    if not r.incremental_vacuum then
      print("  this store predates incremental vacuum: the space is reused, not given back; "
        .. "drover prune --full-vacuum rewrites it once")
    end
  end
  return EXIT_OK
end)

-- A PostgreSQL URL with a password, given on the command line, shows in
-- ps to every user of the machine: say so (libpq's PGPASSFILE or
-- ~/.pgpass, DROVER_STORE or DROVER_HOME/store.conf keep it out of argv).
local function warn_password(loc, who)
  if type(loc) == "string" and loc:match("^postgres[q]?[l]?://[^/@]*:[^/@]*@") then
    io.stderr:write(who, ": warning: the store URL's password shows in ps to every user of this machine; ",
      "use DROVER_STORE, DROVER_HOME/store.conf (drover store use) or a ~/.pgpass file\n")
  end
end

command("store", "the store: where it is, its schema, moving it (migrate, use, copy)", {
  args = "[info | migrate | use LOCATION | copy FROM TO] [--store LOCATION]",
  flags = { store = { arg = true, help = "the store to act on (a SQLite file or a postgresql:// URL; default: "
      .. "$DROVER_STORE, DROVER_HOME/store.conf, DROVER_HOME/drover.db)" },
    json = json_flag },
}, function(opts, pos)
  local store_mod = require "drover.store"
  local sub = pos[1] or "info"
  warn_password(opts.store, "drover store")
  if sub == "info" or sub == "migrate" then
    if pos[2] then usage_error("drover store " .. sub .. ": unexpected argument '" .. pos[2] .. "'") end
    local s = open_store(opts)
    local r = { location = s.location, database = s.dialect.name, schema_version = store_mod.SCHEMA_VERSION,
      migrated_from = s.migrated_from }
    if sub == "info" then r.rows = s:table_counts() end
    s:close()
    if opts.json then out_json(r) return EXIT_OK end
    print(string.format("%s (%s): schema version %d%s", r.location, r.database, r.schema_version,
      r.migrated_from == r.schema_version and "" or
      string.format(" (migrated from %d)", r.migrated_from)))
    if r.rows then
      print(string.format("  %d run(s), %d task run(s), %d log line(s), %d deployment(s), %d package(s)",
        r.rows.flow_runs, r.rows.task_runs, r.rows.logs, r.rows.deployments, r.rows.packages))
    end
    return EXIT_OK
  elseif sub == "use" then
    local loc = pos[2] or usage_error("drover store use: missing LOCATION (a SQLite file or a postgresql:// URL)")
    warn_password(loc, "drover store use")
    local home = store_mod.home()
    local s = open_store { store = loc }
    local label = s.location
    s:close()
    local fs = require "drover.fs"
    local path = home .. "/store.conf"
    -- the URL may hold a password: the file is the user's alone
    local ok, err = fs.write(path, "# the store of this drover home (drover store use)\n" .. loc .. "\n",
      { mode = "0600" })
    if not ok then error("drover store use: cannot write " .. path .. ": " .. tostring(err), 0) end
    print(string.format("%s now keeps its runs in %s (%s)", home, label, path))
    return EXIT_OK
  elseif sub == "copy" then
    local from_loc = pos[2] or usage_error("drover store copy: missing FROM and TO (SQLite files or postgresql:// URLs)")
    local to_loc = pos[3] or usage_error("drover store copy: missing TO (a SQLite file or a postgresql:// URL)")
    warn_password(from_loc, "drover store copy")
    warn_password(to_loc, "drover store copy")
    local from = open_store { store = from_loc }
    local to = open_store { store = to_loc }
    local copied, err = store_mod.copy(from, to)
    local from_label, to_label = from.location, to.location
    from:close()
    to:close()
    if not copied then error("drover store copy: " .. err, 0) end
    if opts.json then out_json(copied) return EXIT_OK end
    print(string.format("copied %s to %s: %d run(s), %d task run(s), %d log line(s), %d deployment(s), %d package(s)",
      from_label, to_label, copied.flow_runs, copied.task_runs, copied.logs, copied.deployments, copied.packages))
    return EXIT_OK
  end
  usage_error("drover store: unknown subcommand '" .. sub .. "' (info, migrate, use, copy)")
end)

command("backends", "list the backends drover can load, and where from", {
  args = "", flags = { json = json_flag },
}, function(opts)
  local list = require("drover.orchestrator").available()
  if opts.json then out_json(list) return EXIT_OK end
  print_table(list, { { "backend", function(b) return b.name end }, { "path", function(b) return b.path end } })
  return EXIT_OK
end)

command("serve", "run the daemon: dashboard, JSON API, worker protocol, events, metrics, reaper", {
  args = "[--port N] [--bind ADDR]",
  flags = { port = { short = "p", arg = true, help = "TCP port (default 8765; 0 picks a free one)" },
    bind = { arg = true, help = "address to listen on (default 127.0.0.1; others need a token)" },
    token = { arg = true, help = "require this bearer token (shows in ps: prefer $DROVER_TOKEN or the file "
      .. "$DROVER_TOKEN_FILE names)" },
    ["public-url"] = { arg = true, help = "the URL workers and browsers reach this server by (its host is accepted)" },
    heartbeat = { arg = true, help = "seconds between workers' heartbeats (default 10); 3 missed end a run CRASHED" },
    ["max-body"] = { arg = true, help = "largest package upload in bytes (default 16 MiB; other requests: 1 MiB)" },
    ["max-connections"] = { arg = true, help = "connections served at once (default 256; more get a 503)" },
    ["tls-cert"] = { arg = true, help = "serve HTTPS with this certificate (PEM; needs --tls-key)" },
    ["tls-key"] = { arg = true, help = "the certificate's private key (PEM)" },
    retention = { arg = true, help = "prune ended runs older than AGE (30d, 12h, ...) every hour, in small batches" },
    store = { arg = true, help = "the store: a SQLite file or a postgresql:// URL (default: $DROVER_STORE, "
      .. "DROVER_HOME/store.conf, DROVER_HOME/drover.db); a password here shows in ps" },
    auto = { help = "(internal) started by drover run: exit if a daemon already runs" } },
}, function(opts)
  local port = opts.port and math.tointeger(tonumber(opts.port))
  if opts.port and (not port or port < 0 or port > 65535) then
    usage_error("drover serve: --port must be a port number (0-65535)")
  end
  local heartbeat = opts.heartbeat and tonumber(opts.heartbeat)
  if opts.heartbeat and (not heartbeat or heartbeat <= 0 or heartbeat ~= heartbeat or heartbeat > 86400) then
    usage_error("drover serve: --heartbeat must be a number of seconds (0 < N <= 86400)")
  end
  local max_body = opts["max-body"] and math.tointeger(tonumber(opts["max-body"]))
  if opts["max-body"] and (not max_body or max_body < 1024) then
    usage_error("drover serve: --max-body must be a number of bytes (at least 1024)")
  end
  local max_conns = opts["max-connections"] and math.tointeger(tonumber(opts["max-connections"]))
  if opts["max-connections"] and (not max_conns or max_conns < 1 or max_conns > 1000000) then
    usage_error("drover serve: --max-connections must be a number (1-1000000)")
  end
  if opts["public-url"] and not opts["public-url"]:match("^https?://[^/]") then
    usage_error("drover serve: --public-url must be an http:// or https:// URL")
  end
  if (opts["tls-cert"] == nil) ~= (opts["tls-key"] == nil) then
    usage_error("drover serve: --tls-cert and --tls-key go together")
  end
  local tls = opts["tls-cert"] and { cert = opts["tls-cert"], key = opts["tls-key"] } or nil
  local retention
  if opts.retention then
    local rerr
    retention, rerr = require("drover.retention").parse_duration(opts.retention)
    if not retention then usage_error("drover serve: --retention " .. rerr) end
  end
  if opts.token then
    -- still accepted (scripts use it), but every user of the machine reads argv
    io.stderr:write("drover serve: warning: --token shows in ps to every user of this machine; "
      .. "use DROVER_TOKEN or DROVER_TOKEN_FILE\n")
  end
  local token = opts.token or require("drover.api_client").token_from_env("DROVER_TOKEN")
  warn_password(opts.store, "drover serve")
  return require("drover.daemon").serve { port = port, bind = opts.bind, token = token, auto = opts.auto,
    store = opts.store,
    public_url = opts["public-url"], heartbeat = heartbeat, max_body = max_body, tls = tls, retention = retention,
    max_connections = max_conns }
end)

command("worker", "(internal) run one flow run (or, with --call, one task call of it)", {
  args = "RUN_ID [CALL_ID] [--api URL]",
  flags = { call = { help = "run call CALL_ID of run RUN_ID (a backend's remote task)" },
    api = { arg = true, help = "report to drover serve at URL (default: $DROVER_API); the run's token comes from "
      .. "$DROVER_RUN_TOKEN or the file $DROVER_RUN_TOKEN_FILE names" },
    ["ca-file"] = { arg = true, help = "CA bundle to verify the server's TLS certificate (default: $DROVER_CA_FILE)" } },
}, function(opts, pos)
  local id = pos[1] or usage_error("drover worker: missing RUN_ID")
  local worker = require "drover.worker"
  local api = opts.api or os.getenv("DROVER_API")
  if api == "" then api = nil end
  local source, o
  if api then
    local token = require("drover.api_client").token_from_env("DROVER_RUN_TOKEN")
    if not token then usage_error("drover worker: --api needs the run's token in DROVER_RUN_TOKEN or DROVER_RUN_TOKEN_FILE") end
    source = worker.remote(id, { url = api, token = token, ca_file = opts["ca-file"] or os.getenv("DROVER_CA_FILE"),
      heartbeat = tonumber(os.getenv("DROVER_HEARTBEAT") or ""),
      delivery_timeout = tonumber(os.getenv("DROVER_DELIVERY_TIMEOUT") or "") })
    local ok, job = pcall(source.job, source)
    if not ok then error("drover worker: run " .. id .. ": " .. tostring(job), 0) end
    o = worker.backend_of(job)
    o._store = source:sink({}) -- the backend tracks through the server, never a store here
  else
    -- the run's own backend, configured as deployed, so its decorator
    -- shapes the calls (slurm: tasks with resources become jobs)
    local store = require("drover.tracker").default_store()
    local run = store:find_flow_run(id)
    if not run then error("unknown run '" .. tostring(id) .. "'", 0) end
    o = load_backend(require("drover.orchestrator").for_run, store, run)
    source = worker.direct(store, run.id)
  end
  if opts.call then
    local call = pos[2] or usage_error("drover worker: --call needs RUN_ID CALL_ID")
    if type(o.work_call) ~= "function" then
      usage_error("drover worker: backend '" .. tostring(o.name) .. "' runs no remote calls")
    end
    return o:work_call(id, call, source)
  end
  return worker.run(o, source)
end)

command("replay", "send the events a worker kept in its spool to the server", {
  args = "SPOOL_FILE [--api URL]",
  flags = { api = { arg = true, help = "the server (default: the URL the spool names, or $DROVER_API)" },
    ["ca-file"] = { arg = true, help = "CA bundle to verify the server's TLS certificate" } },
}, function(opts, pos)
  local file = pos[1] or usage_error("drover replay: missing SPOOL_FILE")
  local token = require("drover.api_client").token_from_env("DROVER_TOKEN")
    or require("drover.api_client").token_from_env("DROVER_RUN_TOKEN")
  local n, msg = require("drover.replay").file(file, { api = opts.api, token = token,
    ca_file = opts["ca-file"] or os.getenv("DROVER_CA_FILE") })
  if not n then error(msg, 0) end
  print(string.format("replayed %d event(s) of run %s", n, msg))
  return EXIT_OK
end)

-- ---- help and dispatch ----------------------------------------------------------------------

local function help_all()
  print("usage: drover COMMAND [options]   (drover FILE.lua runs a plain script)\n")
  print("commands:")
  for _, name in ipairs(order) do if name ~= "worker" then print(string.format("  %-10s %s", name, commands[name].summary)) end end
  print("\nEvery command takes --help; most take --json.  Exit codes: 0 success,")
  print("1 the workflow or the operation failed, 2 usage or configuration error.")
end

local function help_cmd(name)
  local c = commands[name]
  print(string.format("usage: drover %s %s\n\n%s\n", name, c.spec.args or "", c.summary))
  local names = {}
  for f in pairs(c.spec.flags or {}) do names[#names + 1] = f end
  table.sort(names)
  if #names > 0 then print("options:") end
  for _, f in ipairs(names) do
    local fl = c.spec.flags[f]
    local left = (fl.short and ("-" .. fl.short .. ", ") or "    ") .. "--" .. f .. (fl.arg and " VALUE" or "")
    print(string.format("  %-26s %s", left, fl.help or ""))
  end
  print(string.format("  %-26s %s", "    --help", "show this help"))
end

function M.main(argv)
  local name = argv[1]
  if name == nil or name == "help" or name == "--help" then
    if argv[2] and commands[argv[2]] then help_cmd(argv[2]) else help_all() end
    return name == nil and EXIT_USAGE or EXIT_OK
  end
  local c = commands[name]
  if not c then
    -- The C main runs a script only when its name looks like one.
    local file = require("drover.fs").exists(name) and
      string.format("; to run the file %s, write ./%s", name, name) or ""
    io.stderr:write("drover: unknown command '", name, "' (drover help lists them", file, ")\n")
    return EXIT_USAGE
  end
  local rest = { table.unpack(argv, 2) }
  local ok, code = pcall(function()
    local opts, pos = parse(name, c.spec, rest)
    if opts.help then help_cmd(name) return EXIT_OK end
    return c.fn(opts, pos)
  end)
  if ok then return code or EXIT_OK end
  local err = code
  local msg = type(err) == "table" and (err.message or tostring(err)) or tostring(err)
  io.stderr:write("drover: ", msg, "\n")
  return exit_code_of(err)
end

return M
