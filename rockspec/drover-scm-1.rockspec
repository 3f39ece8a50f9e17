-- drover as a LuaRocks rock, for Lua 5.4: the drover.core C module (the
-- engine: libuv, SQLite, the H2O HTTP server), the Lua library, its
-- dashboard files and the backends.  From a checkout:
--
--   luarocks --lua-version=5.4 make rockspec/drover-scm-1.rockspec
--
-- (add --deps-mode=none when no LuaRocks server is reachable).  C libraries:
-- Debian's libuv1-dev, libsqlite3-dev and libh2o-dev, plus the headers of
-- libcurl, OpenSSL and libpq (libpq-dev; drover loads those three with
-- dlopen on first use).
rockspec_format = "3.0"
package = "drover"
version = "scm-1"
source = {
  url = "git+https://github.com/drover-engine/drover.git",
}
description = {
  summary = "A Lua-scriptable workflow orchestration engine on libuv",
  detailed = [[
    drover runs Lua workflows as tasks on a libuv loop (processes, HTTP,
    timers, SQLite without blocking), tracks flow and task runs in a
    SQLite store, and deploys them through backends (local, or your own).
  ]],
  license = "MIT",
}
-- JSON is drover's own (engine/src/json.c): no lua-cjson needed.
dependencies = {
  "lua >= 5.4, < 5.5",
}
external_dependencies = {
  LIBUV = { header = "uv.h", library = "uv" },
  SQLITE = { header = "sqlite3.h", library = "sqlite3" },
  H2O = { header = "h2o.h", library = "h2o" },
  -- libpq is dlopen()ed by drover.pg on first use: only its header is needed
  PQ = { header = "postgresql/libpq-fe.h" },
}
build = {
  type = "builtin",
  modules = {
    -- the same objects the Makefile links into build/lua/drover/core.so
    -- (everything in engine/src but api.c, which is the embedding API, and
    -- searcher.c, the require searcher api.c installs: lua5.4 has its own)
    ["drover.core"] = {
      sources = {
        "engine/src/db.c", "engine/src/dbwriter.c", "engine/src/engine.c", "engine/src/event.c", "engine/src/fs.c",
        "engine/src/http.c", "engine/src/json.c", "engine/src/lalloc.c", "engine/src/lazylib.c", "engine/src/pg.c", "engine/src/proc.c", "engine/src/pset.c",
        "engine/src/sched.c", "engine/src/server.c", "engine/src/sha256.c", "engine/src/signal.c", "engine/src/spawn.c",
        "engine/src/tar.c", "engine/src/timer.c",
      },
      defines = { "_GNU_SOURCE" },
      incdirs = { "engine/include", "engine/src", "$(LIBUV_INCDIR)", "$(SQLITE_INCDIR)", "$(H2O_INCDIR)",
                  "$(PQ_INCDIR)/postgresql" },
      libdirs = { "$(LIBUV_LIBDIR)", "$(SQLITE_LIBDIR)", "$(H2O_LIBDIR)" },
      libraries = { "uv", "sqlite3", "h2o", "m", "dl", "pthread" },
    },
    ["drover"] = "lua/drover/init.lua",
    ["drover.api"] = "lua/drover/api.lua",
    ["drover.api_client"] = "lua/drover/api_client.lua",
    ["drover.class"] = "lua/drover/class.lua",
    ["drover.cli"] = "lua/drover/cli.lua",
    ["drover.client_api"] = "lua/drover/client_api.lua",
    ["drover.context"] = "lua/drover/context.lua",
    ["drover.cron"] = "lua/drover/cron.lua",
    ["drover.daemon"] = "lua/drover/daemon.lua",
    ["drover.daemon_events"] = "lua/drover/daemon_events.lua",
    ["drover.db"] = "lua/drover/db.lua",
    ["drover.pg"] = "lua/drover/pg.lua",
    ["drover.event_batch"] = "lua/drover/event_batch.lua",
    ["drover.events"] = "lua/drover/events.lua",
    ["drover.fs"] = "lua/drover/fs.lua",
    ["drover.http"] = "lua/drover/http.lua",
    ["drover.json"] = "lua/drover/json.lua",
    ["drover.orchestrator"] = "lua/drover/orchestrator.lua",
    ["drover.orchestrator.bundle"] = "lua/drover/orchestrator/bundle.lua",
    ["drover.orchestrator.config"] = "lua/drover/orchestrator/config.lua",
    ["drover.orchestrator.runs"] = "lua/drover/orchestrator/runs.lua",
    ["drover.proc"] = "lua/drover/proc.lua",
    ["drover.process_identity"] = "lua/drover/process_identity.lua",
    ["drover.remote"] = "lua/drover/remote.lua",
    ["drover.replay"] = "lua/drover/replay.lua",
    ["drover.reporter"] = "lua/drover/reporter.lua",
    ["drover.request_guard"] = "lua/drover/request_guard.lua",
    ["drover.retention"] = "lua/drover/retention.lua",
    ["drover.run_token"] = "lua/drover/run_token.lua",
    ["drover.server"] = "lua/drover/server.lua",
    ["drover.states"] = "lua/drover/states.lua",
    ["drover.store"] = "lua/drover/store.lua",
    ["drover.store.batch"] = "lua/drover/store/batch.lua",
    ["drover.store.postgresql"] = "lua/drover/store/postgresql.lua",
    ["drover.store.sqlite"] = "lua/drover/store/sqlite.lua",
    ["drover.tracker"] = "lua/drover/tracker.lua",
    ["drover.worker"] = "lua/drover/worker.lua",
    ["drover.worker_api"] = "lua/drover/worker_api.lua",
  },
  install = {
    -- Next to the modules, where drover.orchestrator.backend_dirs() and
    -- drover.daemon look for them: share/lua/5.4/drover/{backends,dashboard}/
    -- (every backends/*.lua: tests/rockspec_spec.lua checks the list)
    lua = {
      ["drover.backends.docker"] = "backends/docker.lua",
      ["drover.backends.local"] = "backends/local.lua",
      ["drover.backends.slurm"] = "backends/slurm.lua",
      -- its parts, loaded by path from next to it (backends/slurm/)
      ["drover.backends.slurm.calls"] = "backends/slurm/calls.lua",
      ["drover.backends.slurm.jobstate"] = "backends/slurm/jobstate.lua",
      ["drover.backends.slurm.template"] = "backends/slurm/template.lua",
      ["drover.backends.slurm.text"] = "backends/slurm/text.lua",
      ["drover.dashboard.index"] = "lua/drover/dashboard/index.html",
      ["drover.dashboard.app"] = "lua/drover/dashboard/app.js",
      ["drover.dashboard.style"] = "lua/drover/dashboard/style.css",
    },
  },
}
test_dependencies = {
  "busted",
}
-- `luarocks test` (from a checkout, with the rock installed): the specs
-- that need only the installed library, not the drover binary or a build
-- directory (tests/run.sh runs everything).
test = {
  type = "busted",
  flags = { "--lua=lua5.4", "--lpath=tests/?.lua", "tests/cron_spec.lua", "tests/fs_spec.lua",
    "tests/db_spec.lua", "tests/tracker_spec.lua" },
}
