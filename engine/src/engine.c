/*
 * engine.c -- one engine per lua_State: the libuv loop, and the drover.core
 * module that exposes the primitives to Lua.
 *
 * The engine lives in a full userdata anchored in the registry, so that the
 * same code serves the drover binary, libdrover embedders and stock lua5.4
 * loading drover/core.so: whoever closes the lua_State runs the __gc below,
 * which closes every libuv handle and then the loop.
 */
#include "drover_int.h"

#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>

static const char drv__engine_key = 'E';

drv_engine *drv__engine(lua_State *L) {
  drv_engine *E;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__engine_key);
  E = (drv_engine *)lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (E == NULL) luaL_error(L, "drover: engine not initialised (require 'drover.core' first)");
  return E;
}

int drv__run_once(drv_engine *E) {
  int r;
  E->loop_depth++;
  r = uv_run(E->loop, UV_RUN_ONCE);
  E->loop_depth--;
  return r;
}

void drv__log(drv_engine *E, const char *level, const char *fmt, ...) {
  char buf[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (E && E->log) E->log(E->log_ud, level, buf);
  else fprintf(stderr, "%s\n", buf);
}

void drv__res_link(drv_engine *E, drv_res *r, void (*close)(drv_res *r)) {
  r->close = close;
  r->next = E->resources.next;
  r->prev = &E->resources;
  E->resources.next->prev = r;
  E->resources.next = r;
}

void drv__res_unlink(drv_res *r) {
  if (r->next == NULL) return;
  r->prev->next = r->next;
  r->next->prev = r->prev;
  r->next = r->prev = NULL;
}

static void drv__close_walk(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void drv__count_closing(uv_handle_t *h, void *arg) {
  if (uv_is_closing(h)) (*(int *)arg)++;
}

static int drv__engine_gc(lua_State *L) {
  drv_engine *E = (drv_engine *)lua_touserdata(L, 1);
  if (E->closing) return 0;
  E->closing = 1;
  drv__sched_close(E);
  while (E->resources.next != &E->resources) {
    drv_res *r = E->resources.next;
    drv__res_unlink(r);
    r->close(r);
  }
  if (E->http_free) E->http_free(E);
  /* Handles owned by primitives whose Lua side is gone (a detached process
   * nobody waits for, say) are closed here; their close callbacks free them.
   * With a host-owned loop we only close what is ours (below). */
  if (E->owns_loop) {
    uv_walk(E->loop, drv__close_walk, NULL);
    while (uv_run(E->loop, UV_RUN_NOWAIT) != 0) {}
    uv_loop_close(E->loop);
  } else {
    /* Our handles (the run queue's idle handle is inside E) live in memory
     * the Lua state frees when this returns: finish their closing now, on
     * the host's loop, rather than leave the host's next uv_run to touch
     * freed memory. */
    int closing;
    do {
      closing = 0;
      uv_walk(E->loop, drv__count_closing, &closing);
      if (closing) uv_run(E->loop, UV_RUN_NOWAIT);
    } while (closing);
  }
  return 0;
}

/* A process started with fd 0, 1 or 2 closed (`drover x.lua <&-`) would
 * have the loop's epoll fd opened as "stdin", and libuv aborts when it
 * closes an fd below 3; a child told to inherit stdout would write into
 * whatever drover opened there.  Each closed one gets /dev/null first, as
 * node and the shells do -- only when drover makes its own loop: a host
 * that brings its loop has its descriptors in order already. */
static void drv__fill_stdio(void) {
  int fd, n;
  for (fd = 0; fd <= 2; fd++) {
    if (fcntl(fd, F_GETFD) >= 0) continue;
    n = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
    if (n >= 0 && n != fd) close(n); /* cannot happen: the lowest free fd is fd */
  }
}

void drv__engine_attach(lua_State *L, uv_loop_t *loop) {
  drv_engine *E;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__engine_key);
  if (!lua_isnil(L, -1)) { lua_pop(L, 1); return; }
  lua_pop(L, 1);
  E = (drv_engine *)lua_newuserdatauv(L, sizeof *E, 0);
  memset(E, 0, sizeof *E);
  if (loop) {
    E->loop = loop;
  } else {
    drv__fill_stdio();
    if (uv_loop_init(&E->own_loop) != 0) luaL_error(L, "drover: cannot initialise the event loop");
    E->loop = &E->own_loop;
    E->owns_loop = 1;
  }
  {
    lua_State *main;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    main = lua_tothread(L, -1);
    lua_pop(L, 1);
    E->L = main;
  }
  luaL_newmetatable(L, "drover.engine");
  lua_pushcfunction(L, drv__engine_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &drv__engine_key);
  E->resources.next = E->resources.prev = &E->resources;
  uv_idle_init(E->loop, &E->runq_idle);
  E->runq_idle.data = E;
  drv__sched_init(L);
}

/* ---- buffers ---------------------------------------------------------------- */

int drv__grow(void **p, size_t *cap, size_t need, size_t elem, size_t first) {
  size_t c = *cap ? *cap : first;
  void *np;
  if (need <= *cap) return 0;
  while (c < need) c *= 2;
  np = realloc(*p, c * elem);
  if (np == NULL) return -1;
  *p = np;
  *cap = c;
  return 0;
}

/* ---- argument helpers --------------------------------------------------- */

int drv__argerror(lua_State *L, const char *fname, const char *argname,
                  const char *expected, int idx) {
  return luaL_error(L, "%s: bad argument '%s' (%s expected, got %s)", fname, argname,
                    expected, luaL_typename(L, idx));
}

const char *drv__opt_string(lua_State *L, int idx, const char *fname, const char *key,
                            const char *dflt) {
  const char *s = dflt;
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING) {
      luaL_error(L, "%s: bad option '%s' (string expected, got %s)", fname, key,
                 luaL_typename(L, -1));
    }
    s = lua_tostring(L, -1);
  }
  lua_pop(L, 1); /* the string stays alive: it is anchored in the options table */
  return s;
}

/* Raise "F: unknown option 'k' (known: a, b, c)" for the first key of the
 * options table at idx that `keys` (NULL-terminated) does not name, or a
 * key that is not a string: a misspelt option is an error, never ignored. */
void drv__opt_known(lua_State *L, int idx, const char *fname, const char *const keys[]) {
  int i;
  if (lua_type(L, idx) != LUA_TTABLE) return;
  idx = lua_absindex(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    int known = 0;
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "%s: bad argument 'opts' (option names must be strings, got %s)", fname,
                 luaL_typename(L, -1));
    for (i = 0; keys[i] && !known; i++) known = strcmp(lua_tostring(L, -1), keys[i]) == 0;
    if (!known) {
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      for (i = 0; keys[i]; i++) {
        if (i) luaL_addstring(&b, ", ");
        luaL_addstring(&b, keys[i]);
      }
      luaL_pushresult(&b);
      luaL_error(L, "%s: unknown option '%s' (known: %s)", fname, lua_tostring(L, -2),
                 lua_tostring(L, -1));
    }
  }
}

double drv__opt_number(lua_State *L, int idx, const char *fname, const char *key,
                       double dflt) {
  double d = dflt;
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TNUMBER) {
      luaL_error(L, "%s: bad option '%s' (number expected, got %s)", fname, key,
                 luaL_typename(L, -1));
    }
    d = lua_tonumber(L, -1);
  }
  lua_pop(L, 1);
  return d;
}

int drv__opt_bool(lua_State *L, int idx, const char *fname, const char *key, int dflt) {
  int b = dflt;
  if (lua_isnoneornil(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TBOOLEAN) {
      luaL_error(L, "%s: bad option '%s' (boolean expected, got %s)", fname, key,
                 luaL_typename(L, -1));
    }
    b = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
  return b;
}

/* ---- the drover.core module --------------------------------------------- */

static void drv__submodule(lua_State *L, const char *name, lua_CFunction open) {
  lua_newtable(L);
  open(L);
  lua_setfield(L, -2, name);
}

/* drover.pid() -> this process's id */
static int drv__l_pid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_os_getpid());
  return 1;
}

/* drover.time() -> wall-clock seconds since the epoch, microsecond resolution */
static int drv__l_time(lua_State *L) {
  uv_timeval64_t tv;
  if (uv_gettimeofday(&tv) != 0) return 0;
  lua_pushnumber(L, (double)tv.tv_sec + (double)tv.tv_usec / 1e6);
  return 1;
}

/* drover.isatty(fd) -> true if the descriptor is a terminal */
static int drv__l_isatty(lua_State *L) {
  lua_pushboolean(L, uv_guess_handle((uv_file)luaL_checkinteger(L, 1)) == UV_TTY);
  return 1;
}

/* drover.cwd() -> the current working directory */
static int drv__l_cwd(lua_State *L) {
  char buf[4096];
  size_t n = sizeof buf;
  if (uv_cwd(buf, &n) != 0) return 0;
  lua_pushlstring(L, buf, n);
  return 1;
}

/* drover.core.log(level, message): a line through the host's log callback
 * (embedders) or on stderr. */
static int drv__l_log(lua_State *L) {
  static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
  int lv = luaL_checkoption(L, 1, NULL, levels);
  drv__log(drv__engine(L), levels[lv], "%s", luaL_checkstring(L, 2));
  return 0;
}

/* drover.exepath() -> the running executable (the drover binary, or lua5.4) */
static int drv__l_exepath(lua_State *L) {
  char buf[4096];
  size_t n = sizeof buf;
  if (uv_exepath(buf, &n) != 0) return 0;
  lua_pushlstring(L, buf, n);
  return 1;
}

int luaopen_drover_core(lua_State *L);
int luaopen_drover_core(lua_State *L) {
  drv__engine_attach(L, NULL);
  lua_newtable(L);
  drv__open_sched(L);
  drv__open_timer(L);
  drv__open_signal(L);
  drv__open_event(L);
  drv__submodule(L, "proc", drv__open_proc);
  drv__submodule(L, "http", drv__open_http);
  drv__submodule(L, "fs", drv__open_fs);
  drv__submodule(L, "json", drv__open_json);
  drv__submodule(L, "db", drv__open_db);
  drv__submodule(L, "pg", drv__open_pg);
  drv__submodule(L, "server", drv__open_server);
  lua_pushcfunction(L, drv__l_pid);
  lua_setfield(L, -2, "pid");
  lua_pushcfunction(L, drv__l_isatty);
  lua_setfield(L, -2, "isatty");
  lua_pushcfunction(L, drv__l_cwd);
  lua_setfield(L, -2, "cwd");
  lua_pushcfunction(L, drv__l_time);
  lua_setfield(L, -2, "time");
  lua_pushcfunction(L, drv__l_exepath);
  lua_setfield(L, -2, "exepath");
  lua_pushcfunction(L, drv__l_log);
  lua_setfield(L, -2, "log");
  lua_pushliteral(L, DRV_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
