/*
 * api.c -- the public C API (drover.h) over the engine.
 *
 * drover_open builds a Lua state the way the drover binary needs it: the
 * standard libraries, drover.core preloaded, package.path pointed
 * at the Lua library, and a "drover.config" table the Lua side reads for
 * its directories.
 *
 * The calls that take JSON (backend operations, workflow files) are thin C
 * over lua/drover/api.lua, run as a task: it reports the caller's mistakes
 * in a "box" table instead of raising, so each maps to its own error code.
 *
 * Each blocking call waits for the task it starts and the tasks that task
 * spawns, not for every task on the engine (drover.run's groups, sched.c).
 */
#include "drover_int.h"
#include "drover.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef DRV_PREFIX
#define DRV_PREFIX "/usr/local"
#endif


struct drover {
  lua_State *L;
  drv_lalloc *alloc;   /* L's allocator (lalloc.c), freed after L */
  int attached;        /* drv__setup ran: the engine (loop, scheduler) exists */
  int broken;          /* drover_open failed: every call that runs Lua refuses */
  char openerr[PATH_MAX + 256]; /* ... with this message */
  char errmsg[8192];
  char lua_dir[PATH_MAX + 64];
  char backends_dir[PATH_MAX + 128];
  drover *next_open;   /* the list of open engines (drv__open_engines) */
};

/* Every engine drover_open returned and drover_close has not closed yet.
 * drover_close looks its argument up here before touching it, so that
 * closing an engine a second time does nothing instead of freeing it
 * twice.  Engines live on several threads at once: hence the mutex. */
static drover *drv__open_engines;
static pthread_mutex_t drv__open_lock = PTHREAD_MUTEX_INITIALIZER;

static void drv__remember(drover *D) {
  pthread_mutex_lock(&drv__open_lock);
  D->next_open = drv__open_engines;
  drv__open_engines = D;
  pthread_mutex_unlock(&drv__open_lock);
}

/* Take D off the list; 0 when it was not on it (closed, or never opened). */
static int drv__forget(drover *D) {
  drover **pp;
  int found = 0;
  pthread_mutex_lock(&drv__open_lock);
  for (pp = &drv__open_engines; *pp; pp = &(*pp)->next_open) {
    if (*pp == D) {
      *pp = D->next_open;
      found = 1;
      break;
    }
  }
  pthread_mutex_unlock(&drv__open_lock);
  return found;
}

/* Registry keys: the stock require (saved by drv__setup) and drover.api. */
static const char drv__require_key = 'R';
static const char drv__glue_key = 'G';

static void drv__seterr(drover *D, const char *msg) {
  snprintf(D->errmsg, sizeof D->errmsg, "%s", msg ? msg : "unknown error");
}

static int drv__tostr(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

/* The error object on top of the stack becomes the message, and is popped.
 * luaL_tolstring honours __tostring; it runs protected because __tostring
 * may itself raise (or return a non-string). */
static void drv__seterr_top(drover *D) {
  lua_State *L = D->L;
  const char *m;
  lua_pushcfunction(L, drv__tostr);
  lua_insert(L, -2);
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && (m = lua_tostring(L, -1)) != NULL)
    drv__seterr(D, m);
  else
    drv__seterr(D, "(error object could not be converted to a string)");
  lua_pop(L, 1);
}

/* On an engine drover_open could not set up, every call that runs Lua
 * fails with DROVER_ELOAD and drover_open's message, rather than with a
 * confusing error of its own later. */
static int drv__broken(drover *D) {
  if (!D->broken) return 0;
  drv__seterr(D, D->openerr);
  return 1;
}

static int drv__isfile(const char *path) { return access(path, R_OK) == 0; }

/* Is DIR/drover/init.lua there?  Then DIR is the Lua library: record it and
 * the backends next to it (DIR/../backends), both made absolute. */
static int drv__try_lua_dir(drover *D, const char *dir) {
  char probe[PATH_MAX + 64], real[PATH_MAX];
  if (snprintf(probe, sizeof probe, "%s/drover/init.lua", dir) >= (int)sizeof probe) return 0;
  if (!drv__isfile(probe)) return 0;
  if (realpath(dir, real)) snprintf(D->lua_dir, sizeof D->lua_dir, "%s", real);
  else snprintf(D->lua_dir, sizeof D->lua_dir, "%.*s", PATH_MAX, dir);
  snprintf(D->backends_dir, sizeof D->backends_dir, "%s/../backends", D->lua_dir);
  if (realpath(D->backends_dir, real)) snprintf(D->backends_dir, sizeof D->backends_dir, "%s", real);
  return 1;
}

/* Look next to a file (the library or the program): FILE's dir/../lua (a
 * build tree: build/../lua) or FILE's dir/../share/drover/lua (installed:
 * PREFIX/lib/libdrover.so or PREFIX/bin/drover -> PREFIX/share/drover/lua). */
static int drv__try_near(drover *D, const char *file) {
  static const char *const pats[] = {"%s/../lua", "%s/../share/drover/lua"};
  char dir[PATH_MAX], cand[PATH_MAX + 32];
  char *slash;
  size_t i;
  if (realpath(file, dir) == NULL) snprintf(dir, sizeof dir, "%s", file);
  slash = strrchr(dir, '/');
  if (slash == NULL) return 0;
  *slash = '\0';
  for (i = 0; i < sizeof pats / sizeof pats[0]; i++) {
    snprintf(cand, sizeof cand, pats[i], dir);
    if (drv__try_lua_dir(D, cand)) return 1;
  }
  return 0;
}

/* Where `require "drover"` would find the library through the Lua path
 * ($LUA_PATH_5_4 or $LUA_PATH, ";;" standing for the default path, as
 * package.path is built): the first TEMPLATE with "drover" for "?" that
 * names a file, if that file is a drover/init.lua.  This is how a program
 * run from a checkout with LUA_PATH set (the C tests) finds it. */
static int drv__try_lua_path(drover *D) {
  const char *env = getenv("LUA_PATH_5_4"), *dd, *p, *end;
  char *path, cand[PATH_MAX];
  size_t n;
  int found = 0;
  if (env == NULL) env = getenv("LUA_PATH");
  if (env == NULL) env = LUA_PATH_DEFAULT;
  n = strlen(env) + sizeof LUA_PATH_DEFAULT + 2;
  if ((path = (char *)malloc(n)) == NULL) return 0;
  if ((dd = strstr(env, ";;")) != NULL) /* the first ";;" only, as Lua does */
    snprintf(path, n, "%.*s;%s;%s", (int)(dd - env), env, LUA_PATH_DEFAULT, dd + 2);
  else
    snprintf(path, n, "%s", env);
  for (p = path; *p; p = *end ? end + 1 : end) {
    size_t k = 0, len;
    end = strchr(p, ';');
    if (end == NULL) end = p + strlen(p);
    for (; p < end && k + 7 < sizeof cand; p++) {
      if (*p == '?') k += (size_t)snprintf(cand + k, sizeof cand - k, "drover");
      else cand[k++] = *p;
    }
    cand[k] = '\0';
    if (p < end || k == 0 || !drv__isfile(cand)) continue; /* too long, empty or absent */
    /* the first file found is what require would load: ours only if it
     * is a drover/init.lua */
    len = strlen("/drover/init.lua");
    if (k > len && strcmp(cand + k - len, "/drover/init.lua") == 0) {
      cand[k - len] = '\0';
      found = drv__try_lua_dir(D, cand);
    }
    break;
  }
  free(path);
  return found;
}

/* Find lua/ and backends/: the option, $DROVER_LUA_DIR, next to the file
 * holding this code (libdrover.so, or the program libdrover.a is linked
 * into), next to the running program, the compiled-in prefix, and last
 * the Lua path.  Locating relative to the library is what lets
 * `make install PREFIX=X` work without rebuilding, and an installed tree
 * be moved as a whole.  When none has drover/init.lua, D->lua_dir is the
 * prefix's, for drover_open's message. */
static void drv__find_dirs(drover *D, const drover_options *o) {
  char exe[PATH_MAX], prefix_lua[PATH_MAX];
  size_t n = sizeof exe;
  const char *env = getenv("DROVER_LUA_DIR");
  Dl_info info;
  if (o && o->lua_dir) {
    snprintf(D->lua_dir, sizeof D->lua_dir, "%s", o->lua_dir);
    snprintf(D->backends_dir, sizeof D->backends_dir, "%s/../backends", o->lua_dir);
    return;
  }
  if (env && *env) {
    snprintf(D->lua_dir, sizeof D->lua_dir, "%s", env);
    snprintf(D->backends_dir, sizeof D->backends_dir, "%s/../backends", env);
    return;
  }
  if (dladdr((void *)&drover_open, &info) != 0 && info.dli_fname && *info.dli_fname &&
      drv__try_near(D, info.dli_fname))
    return;
  if (uv_exepath(exe, &n) == 0 && drv__try_near(D, exe)) return;
  snprintf(prefix_lua, sizeof prefix_lua, "%s/share/drover/lua", DRV_PREFIX);
  if (drv__try_lua_dir(D, prefix_lua) || drv__try_lua_path(D)) return;
  snprintf(D->lua_dir, sizeof D->lua_dir, "%s", prefix_lua);
  snprintf(D->backends_dir, sizeof D->backends_dir, "%s/share/drover/backends", DRV_PREFIX);
}

static void drv__setfield_str(lua_State *L, const char *k, const char *v) {
  if (v == NULL) return;
  lua_pushstring(L, v);
  lua_setfield(L, -2, k);
}

/* __index of drover.host: a name nobody registered. */
static int drv__host_missing(lua_State *L) {
  return luaL_error(L, "drover.host.%s: no host function of that name (drover_register adds them)",
                    luaL_tolstring(L, 2, NULL));
}

static int drv__setup(lua_State *L) {
  drover *D = (drover *)lua_touserdata(L, 1);
  const drover_options *o = (const drover_options *)lua_touserdata(L, 2);
  luaL_openlibs(L);
  lua_getglobal(L, "require");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &drv__require_key);
  drv__engine_attach(L, o ? o->loop : NULL);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_drover_core);
  lua_setfield(L, -2, "drover.core");
  lua_pop(L, 1);
  /* package.path: the drover library first, then whatever LUA_PATH says */
  lua_getglobal(L, "package");
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", D->lua_dir, D->lua_dir);
  lua_getfield(L, -2, "path");
  lua_concat(L, 2);
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
  drv__searcher_install(L);
  /* package.loaded["drover.config"] */
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_newtable(L);
  drv__setfield_str(L, "lua_dir", D->lua_dir);
  drv__setfield_str(L, "backends_dir", D->backends_dir);
  if (o) {
    drv__setfield_str(L, "home", o->home);
    drv__setfield_str(L, "path", o->path);
  }
  lua_setfield(L, -2, "drover.config");
  lua_pop(L, 1);
  /* package.loaded["drover.host"]: the functions drover_register adds */
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_newtable(L);
  lua_newtable(L);
  lua_pushcfunction(L, drv__host_missing);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  lua_setfield(L, -2, "drover.host");
  lua_pop(L, 1);
  if (o && o->log) {
    drv__engine(L)->log = o->log;
    drv__engine(L)->log_ud = o->log_ud;
  }
  if (o && o->exit_on_signal) drv__exit_on_signals(drv__engine(L));
  return 0;
}

drover *drover_open(const drover_options *opts) {
  char probe[sizeof ((drover *)0)->lua_dir + 32];
  drover *D = (drover *)calloc(1, sizeof *D);
  if (D == NULL) return NULL;
  D->alloc = drv__lalloc_new();
  D->L = drv__lalloc_newstate(D->alloc);
  if (D->L == NULL) {
    drv__lalloc_free(D->alloc);
    free(D);
    return NULL;
  }
  drv__find_dirs(D, opts);
  lua_pushcfunction(D->L, drv__setup);
  lua_pushlightuserdata(D->L, D);
  lua_pushlightuserdata(D->L, (void *)opts);
  if (lua_pcall(D->L, 2, 0, 0) != LUA_OK) {
    drv__seterr_top(D);
    snprintf(D->openerr, sizeof D->openerr, "drover_open: %.4000s", D->errmsg);
    D->broken = 1;
  } else {
    D->attached = 1;
  }
  /* Without the Lua library every later call would fail with a long
   * "module 'drover' not found" list; say what is wrong, once, here. */
  snprintf(probe, sizeof probe, "%s/drover/init.lua", D->lua_dir);
  if (!D->broken && !drv__isfile(probe)) {
    snprintf(D->openerr, sizeof D->openerr,
             "drover_open: Lua library not found in %.*s (set lua_dir or DROVER_LUA_DIR)", PATH_MAX,
             D->lua_dir);
    D->broken = 1;
  }
  if (D->broken) drv__seterr(D, D->openerr);
  drv__remember(D);
  return D;
}

void drover_close(drover *D) {
  if (D == NULL || !drv__forget(D)) return;
  lua_close(D->L);
  drv__lalloc_free(D->alloc);
  free(D);
}

const char *drover_errmsg(const drover *D) {
  if (D == NULL) return "drover: engine is NULL";
  return D->errmsg;
}

lua_State *drover_lua(drover *D) { return D ? D->L : NULL; }

uv_loop_t *drover_loop(drover *D) {
  if (D == NULL || !D->attached) return NULL;
  return drv__engine(D->L)->loop;
}

/* Call drover.run(chunk, ...) with the chunk and n args on the stack. */
static int drv__run_chunk(drover *D, int nargs) {
  lua_State *L = D->L;
  int base = lua_gettop(L) - nargs; /* index of the chunk */
  lua_pushcfunction(L, drv__run);
  lua_insert(L, base);
  if (lua_pcall(L, nargs + 1, 0, 0) != LUA_OK) {
    drv__seterr_top(D);
    lua_settop(L, base - 1);
    return DROVER_ERUN;
  }
  D->errmsg[0] = '\0';
  return DROVER_OK;
}

int drover_call(drover *D, int nargs) {
  if (D == NULL) return DROVER_EARG;
  if (nargs < 0 || lua_gettop(D->L) < nargs + 1 || !lua_isfunction(D->L, -nargs - 1)) {
    drv__seterr(D, "drover_call: no function below the arguments on the stack");
    return DROVER_EARG;
  }
  if (drv__broken(D)) {
    lua_pop(D->L, nargs + 1); /* popped, as on any other outcome */
    return DROVER_ELOAD;
  }
  return drv__run_chunk(D, nargs);
}

int drover_dofile(drover *D, const char *path, int argc, const char *const *argv) {
  lua_State *L;
  int i;
  if (D == NULL) return DROVER_EARG;
  if (path == NULL || argc < 0 || (argc > 0 && argv == NULL)) {
    drv__seterr(D, "drover_dofile: path is NULL or argv does not match argc");
    return DROVER_EARG;
  }
  if (drv__broken(D)) return DROVER_ELOAD;
  L = D->L;
  /* arg: arg[0] = script, arg[1..] = its arguments, as lua5.4 sets it */
  lua_createtable(L, argc, 1);
  lua_pushstring(L, path);
  lua_rawseti(L, -2, 0);
  for (i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_setglobal(L, "arg");
  if (luaL_loadfile(L, path) != LUA_OK) {
    drv__seterr(D, lua_tostring(L, -1));
    lua_pop(L, 1);
    return DROVER_ELOAD;
  }
  for (i = 1; i < argc; i++) lua_pushstring(L, argv[i]);
  return drv__run_chunk(D, argc > 0 ? argc - 1 : 0);
}

int drover_dostring(drover *D, const char *code, const char *chunkname) {
  if (D == NULL) return DROVER_EARG;
  if (code == NULL) {
    drv__seterr(D, "drover_dostring: code is NULL");
    return DROVER_EARG;
  }
  if (drv__broken(D)) return DROVER_ELOAD;
  if (luaL_loadbuffer(D->L, code, strlen(code), chunkname ? chunkname : "=(string)") != LUA_OK) {
    drv__seterr(D, lua_tostring(D->L, -1));
    lua_pop(D->L, 1);
    return DROVER_ELOAD;
  }
  return drv__run_chunk(D, 0);
}

/* ---- host functions ---------------------------------------------------- */

/* A Lua identifier: letters, digits and _, not starting with a digit, and
 * not a reserved word (drover.host.end would not even parse). */
static int drv__valid_name(const char *name) {
  static const char *const reserved[] = {
      "and",  "break", "do",  "else", "elseif", "end",    "false", "for",  "function", "goto", "if",
      "in",   "local", "nil", "not",  "or",     "repeat", "return", "then", "true",     "until", "while"};
  const char *p;
  size_t i;
  if (name == NULL || !*name || (*name >= '0' && *name <= '9')) return 0;
  for (p = name; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_'))
      return 0;
  for (i = 0; i < sizeof reserved / sizeof reserved[0]; i++)
    if (strcmp(name, reserved[i]) == 0) return 0;
  return 1;
}

int drover_register(drover *D, const char *name, lua_CFunction fn, void *ud) {
  lua_State *L;
  if (D == NULL) return DROVER_EARG;
  if (fn == NULL) {
    drv__seterr(D, "drover_register: fn is NULL");
    return DROVER_EARG;
  }
  if (!drv__valid_name(name)) {
    snprintf(D->errmsg, sizeof D->errmsg,
             "drover_register: bad argument 'name' ('%.200s' is not a Lua identifier: letters, digits "
             "and _, not starting with a digit, not a reserved word)",
             name ? name : "(null)");
    return DROVER_EARG;
  }
  if (drv__broken(D)) return DROVER_ELOAD;
  L = D->L;
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(L, -1, "drover.host");
  if (!lua_istable(L, -1)) {
    lua_pop(L, 2);
    drv__seterr(D, "drover_register: the engine was not set up (see drover_open)");
    return DROVER_ELOAD;
  }
  lua_pushlightuserdata(L, ud);
  lua_pushcclosure(L, fn, 1);
  lua_setfield(L, -2, name);
  lua_pop(L, 2);
  D->errmsg[0] = '\0';
  return DROVER_OK;
}

void *drover_host_ud(lua_State *L) {
  return L ? lua_touserdata(L, lua_upvalueindex(1)) : NULL;
}

void drover_free(void *p) { free(p); }

/* ---- backends, workflow files, started tasks: lua/drover/api.lua -------- */

/* The Lua side of these calls is the module drover.api: its box functions
 * run as tasks and never raise for the caller's mistakes; they fill
 * box.code ("arg", "load", "notimpl", "run"), box.err and box.out, which
 * drv__glue_run maps to return codes.  The module is required through the
 * require drv__setup saved, so a script that replaces the global cannot
 * break the API, and kept in the registry. */
/* Push drover.api's function FN; 0 on failure (message set). */
static int drv__push_glue(drover *D, const char *fn) {
  lua_State *L = D->L;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__glue_key);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__require_key);
    lua_pushliteral(L, "drover.api");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
      drv__seterr_top(D);
      return 0;
    }
    if (!lua_istable(L, -1)) {
      lua_pop(L, 1);
      drv__seterr(D, "drover.api did not return a table");
      return 0;
    }
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &drv__glue_key);
  }
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  return 1;
}

static char *drv__strdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *p = (char *)malloc(n);
  if (p) memcpy(p, s, n);
  return p;
}

/* Run glue FN(box, <nargs values already pushed>) as a task; map box.code to
 * a return code and hand box.out to *out (malloc'd) when out is not NULL. */
static int drv__glue_run(drover *D, const char *fn, int nargs, char **out) {
  lua_State *L = D->L;
  int base = lua_gettop(L) - nargs, rc, box;
  if (!drv__push_glue(D, fn)) {
    lua_settop(L, base);
    return DROVER_ELOAD;
  }
  lua_newtable(L);
  box = lua_gettop(L);
  lua_pushvalue(L, box - 1); /* fn */
  lua_pushvalue(L, box);     /* box */
  {
    int i;
    for (i = 1; i <= nargs; i++) lua_pushvalue(L, base + i);
  }
  rc = drv__run_chunk(D, nargs + 1);
  if (rc == DROVER_OK) {
    const char *code;
    lua_getfield(L, box, "code");
    code = lua_tostring(L, -1);
    if (code) {
      lua_getfield(L, box, "err");
      drv__seterr(D, lua_tostring(L, -1));
      lua_pop(L, 1);
      rc = strcmp(code, "arg") == 0 ? DROVER_EARG
           : strcmp(code, "load") == 0 ? DROVER_ELOAD
           : strcmp(code, "notimpl") == 0 ? DROVER_ENOTIMPL
           : DROVER_ERUN;
    }
    lua_pop(L, 1);
    lua_getfield(L, box, "out");
    if (out && lua_type(L, -1) == LUA_TSTRING) {
      *out = drv__strdup(lua_tostring(L, -1));
      if (*out == NULL) {
        drv__seterr(D, "out of memory");
        rc = DROVER_ENOMEM;
      }
    }
    lua_pop(L, 1);
  }
  lua_settop(L, base);
  return rc;
}

int drover_backend_load(drover *D, const char *backend) {
  if (D == NULL) return DROVER_EARG;
  if (backend == NULL || !*backend) {
    drv__seterr(D, "drover_backend_load: backend is NULL or empty");
    return DROVER_EARG;
  }
  if (drv__broken(D)) return DROVER_ELOAD;
  lua_pushstring(D->L, backend);
  return drv__glue_run(D, "load", 1, NULL);
}

int drover_backend_call(drover *D, const char *backend, const char *config_json, const char *op,
                        const char *args_json, char **out_json) {
  if (out_json) *out_json = NULL;
  if (D == NULL) return DROVER_EARG;
  if (backend == NULL || !*backend || op == NULL) {
    drv__seterr(D, backend == NULL || !*backend ? "drover_backend_call: backend is NULL or empty"
                                                : "drover_backend_call: op is NULL");
    return DROVER_EARG;
  }
  if (drv__broken(D)) return DROVER_ELOAD;
  lua_pushstring(D->L, backend);
  lua_pushstring(D->L, config_json); /* NULL pushes nil */
  lua_pushstring(D->L, op);
  lua_pushstring(D->L, args_json);
  return drv__glue_run(D, "call", 4, out_json);
}

int drover_exec(drover *D, const char *path, const char *params_json, char **out_json) {
  if (out_json) *out_json = NULL;
  if (D == NULL) return DROVER_EARG;
  if (path == NULL) {
    drv__seterr(D, "drover_exec: path is NULL");
    return DROVER_EARG;
  }
  if (drv__broken(D)) return DROVER_ELOAD;
  lua_pushstring(D->L, path);
  lua_pushstring(D->L, params_json);
  return drv__glue_run(D, "exec", 2, out_json);
}

/* ---- a loop the host owns ------------------------------------------------ */

int drover_start(drover *D, const char *code, const char *chunkname) {
  lua_State *L;
  if (D == NULL) return DROVER_EARG;
  if (code == NULL) {
    drv__seterr(D, "drover_start: code is NULL");
    return DROVER_EARG;
  }
  if (drv__broken(D)) return DROVER_ELOAD;
  L = D->L;
  if (luaL_loadbuffer(L, code, strlen(code), chunkname ? chunkname : "=(string)") != LUA_OK) {
    drv__seterr(D, lua_tostring(L, -1));
    lua_pop(L, 1);
    return DROVER_ELOAD;
  }
  if (!drv__push_glue(D, "start")) {
    lua_pop(L, 1);
    return DROVER_ELOAD;
  }
  lua_insert(L, -2);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    drv__seterr_top(D);
    return DROVER_ERUN;
  }
  D->errmsg[0] = '\0';
  return DROVER_OK;
}

int drover_step(drover *D) {
  drv_engine *E;
  if (D == NULL) return DROVER_EARG;
  if (!D->attached) {
    drv__seterr(D, D->openerr);
    return DROVER_ELOAD;
  }
  E = drv__engine(D->L);
  if (E->loop_depth > 0) {
    drv__seterr(D, "drover_step: called while the engine is running its loop (from a callback)");
    return DROVER_EARG;
  }
  E->loop_depth++;
  uv_run(E->loop, UV_RUN_NOWAIT);
  E->loop_depth--;
  return E->live_tasks;
}
