/*
 * signal.c -- drover.on_signal: run Lua when the process gets a signal.
 *
 * libuv turns signals into loop events, so the handler runs as an ordinary
 * task (it may wait, cancel other tasks, write to the store) rather than in
 * async-signal context.  This is how `drover exec` turns Ctrl-C into a
 * two-phase cancel and how workers react to SIGTERM from `drover stop`.
 */
#include "drover_int.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <stdio.h>
#include <unistd.h>

#define DRV_SIGNAL_MT "drover.signal"

typedef struct {
  drv_res res;      /* first: closed with the engine if never stopped */
  uv_signal_t handle;
  drv_engine *E;
  int fn_ref;       /* the Lua handler */
  int signum;
  int active;
} drv_signal;

/* The one table of signal names (drover.kill, on_signal and proc:kill all
 * read names through drv__signum). */
static const struct { const char *name; int num; } drv__signames[] = {
    {"HUP", SIGHUP},   {"INT", SIGINT},     {"QUIT", SIGQUIT},   {"ILL", SIGILL},
    {"TRAP", SIGTRAP}, {"ABRT", SIGABRT},   {"BUS", SIGBUS},     {"FPE", SIGFPE},
    {"KILL", SIGKILL}, {"USR1", SIGUSR1},   {"SEGV", SIGSEGV},   {"USR2", SIGUSR2},
    {"PIPE", SIGPIPE}, {"ALRM", SIGALRM},   {"TERM", SIGTERM},   {"CHLD", SIGCHLD},
    {"CONT", SIGCONT}, {"STOP", SIGSTOP},   {"TSTP", SIGTSTP},   {"TTIN", SIGTTIN},
    {"TTOU", SIGTTOU}, {"URG", SIGURG},     {"XCPU", SIGXCPU},   {"XFSZ", SIGXFSZ},
    {"VTALRM", SIGVTALRM}, {"PROF", SIGPROF}, {"WINCH", SIGWINCH}, {"IO", SIGIO},
    {"SYS", SIGSYS},   {NULL, 0}};

/* Signal number from an integer in [0, NSIG) or a name, any case, with or
 * without "SIG" ("TERM", "SIGTERM", "kill"); -1 if it is neither. */
int drv__signum(lua_State *L, int idx) {
  const char *s;
  int i;
  if (lua_type(L, idx) == LUA_TNUMBER) {
    lua_Integer n;
    if (!lua_isinteger(L, idx) || (n = lua_tointeger(L, idx)) < 0 || n >= NSIG) return -1;
    return (int)n;
  }
  if (lua_type(L, idx) != LUA_TSTRING) return -1;
  s = lua_tostring(L, idx);
  if (strncasecmp(s, "SIG", 3) == 0) s += 3;
  for (i = 0; drv__signames[i].name; i++)
    if (strcasecmp(s, drv__signames[i].name) == 0) return drv__signames[i].num;
  return -1;
}

static void drv__signal_closed(uv_handle_t *h) { free(h->data); }

static void drv__signal_cb(uv_signal_t *h, int signum) {
  drv_signal *s = (drv_signal *)h->data;
  lua_State *L = s->E->L;
  int top = lua_gettop(L);
  /* Run the handler as a new task: spawn(fn, signame) through drover.core. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->fn_ref);
  lua_getfield(L, -1, "spawn");
  lua_getfield(L, -2, "fn");
  lua_pushinteger(L, signum);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) { /* only out of memory can get here */ }
  lua_settop(L, top);
}

static void drv__signal_close_res(drv_res *r) {
  drv_signal *s = (drv_signal *)r;
  s->active = 0;
  uv_close((uv_handle_t *)&s->handle, drv__signal_closed);
}

static void drv__signal_release(lua_State *L, drv_signal *s) {
  if (!s->active) return;
  luaL_unref(L, LUA_REGISTRYINDEX, s->fn_ref);
  s->fn_ref = LUA_NOREF;
  drv__res_unlink(&s->res);
  drv__signal_close_res(&s->res);
}

static int drv__l_signal_stop(lua_State *L) {
  drv_signal **pp = (drv_signal **)luaL_testudata(L, 1, DRV_SIGNAL_MT);
  if (pp == NULL) return drv__argerror(L, "signal:stop", "self", "signal handle", 1);
  if (*pp) { drv__signal_release(L, *pp); *pp = NULL; }
  return 0;
}

/* drover.on_signal(sig, fn) -> handle with :stop().  fn(signum) runs as a
 * task each time the signal arrives; the default action is suppressed
 * while the handle is active. */
static int drv__l_on_signal(lua_State *L) {
  drv_engine *E = drv__engine(L);
  int signum = drv__signum(L, 1);
  drv_signal *s, **pp;
  if (lua_type(L, 1) != LUA_TNUMBER && lua_type(L, 1) != LUA_TSTRING)
    return drv__argerror(L, "drover.on_signal", "signal", "signal name or number", 1);
  if (signum <= 0 || signum == SIGKILL || signum == SIGSTOP)
    return luaL_error(L, "drover.on_signal: bad argument 'signal' (cannot handle '%s')",
                      lua_tostring(L, 1));
  if (!lua_isfunction(L, 2)) return drv__argerror(L, "drover.on_signal", "fn", "function", 2);
  s = (drv_signal *)calloc(1, sizeof *s);
  if (s == NULL) return luaL_error(L, "drover.on_signal: out of memory");
  s->E = E;
  s->signum = signum;
  /* registry holds {spawn = drover.core.spawn, fn = fn} */
  lua_createtable(L, 0, 2);
  lua_pushvalue(L, 2);
  lua_setfield(L, -2, "fn");
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_getfield(L, -1, "spawn");
  lua_setfield(L, -3, "spawn");
  lua_pop(L, 1);
  s->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_signal_init(E->loop, &s->handle);
  s->handle.data = s;
  uv_signal_start(&s->handle, drv__signal_cb, signum);
  /* A pending signal handler must not keep drover.run from returning. */
  uv_unref((uv_handle_t *)&s->handle);
  s->active = 1;
  drv__res_link(E, &s->res, drv__signal_close_res);
  pp = (drv_signal **)lua_newuserdatauv(L, sizeof *pp, 0);
  *pp = s;
  luaL_setmetatable(L, DRV_SIGNAL_MT);
  return 1;
}

/* drover.kill(pid, sig) -> true | nil, message.  A negative pid is a
 * process group; sig 0 only checks that the target exists. */
static int drv__l_kill(lua_State *L) {
  lua_Integer pid;
  int signum = 15;
  if (!lua_isinteger(L, 1)) return drv__argerror(L, "drover.kill", "pid", "integer", 1);
  pid = lua_tointeger(L, 1);
  if (pid == 0 || pid == -1) return luaL_error(L, "drover.kill: bad argument 'pid' (refusing %d)", (int)pid);
  if (!lua_isnoneornil(L, 2)) {
    signum = drv__signum(L, 2);
    if (signum < 0) return luaL_error(L, "drover.kill: bad argument 'signal' (unknown signal '%s')",
                                      luaL_tolstring(L, 2, NULL));
  }
  {
    int r = uv_kill((int)pid, signum);
    if (r == 0) {
      lua_pushboolean(L, 1);
      return 1;
    }
    lua_pushnil(L);
    lua_pushfstring(L, "drover.kill: %d: %s", (int)pid, uv_strerror(r));
    return 2;
  }
}

/* ---- exit on signal (for the command-line program) ----------------------- */

typedef struct drv_exitsigs drv_exitsigs;
typedef struct {
  uv_signal_t handle;
  drv_exitsigs *owner;
} drv_exitsig;

struct drv_exitsigs {
  drv_res res;           /* first: the engine closes the watchers with itself */
  drv_engine *E;
  drv_exitsig sigs[3];
  int open;              /* handles not yet closed */
};

static void drv__exitsig_cb(uv_signal_t *h, int signum) {
  drv_engine *E = ((drv_exitsig *)h->data)->owner->E;
  /* Closing a process resource ends its child's process group; the rest are
   * just handles.  Then leave: the OS reclaims everything else. */
  while (E->resources.next != &E->resources) {
    drv_res *r = E->resources.next;
    drv__res_unlink(r);
    r->close(r);
  }
  fflush(NULL);
  _exit(128 + signum);
}

static void drv__exitsig_closed(uv_handle_t *h) {
  drv_exitsigs *xs = ((drv_exitsig *)h->data)->owner;
  if (--xs->open == 0) free(xs);
}

static void drv__exitsig_close_res(drv_res *r) {
  drv_exitsigs *xs = (drv_exitsigs *)r;
  int i;
  for (i = 0; i < 3; i++) uv_close((uv_handle_t *)&xs->sigs[i].handle, drv__exitsig_closed);
}

void drv__exit_on_signals(drv_engine *E) {
  static const int sigs[3] = {SIGINT, SIGTERM, SIGHUP};
  drv_exitsigs *xs = (drv_exitsigs *)calloc(1, sizeof *xs);
  int i;
  if (xs == NULL) return;
  xs->E = E;
  for (i = 0; i < 3; i++) {
    xs->sigs[i].owner = xs;
    uv_signal_init(E->loop, &xs->sigs[i].handle);
    xs->sigs[i].handle.data = &xs->sigs[i];
    uv_signal_start(&xs->sigs[i].handle, drv__exitsig_cb, sigs[i]);
    uv_unref((uv_handle_t *)&xs->sigs[i].handle);
    xs->open++;
  }
  drv__res_link(E, &xs->res, drv__exitsig_close_res);
}

int drv__open_signal(lua_State *L) {
  if (luaL_newmetatable(L, DRV_SIGNAL_MT)) {
    lua_newtable(L);
    lua_pushcfunction(L, drv__l_signal_stop);
    lua_setfield(L, -2, "stop");
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushvalue(L, -1); /* the drover.core table, as upvalue, to reach spawn */
  lua_pushcclosure(L, drv__l_on_signal, 1);
  lua_setfield(L, -2, "on_signal");
  lua_pushcfunction(L, drv__l_kill);
  lua_setfield(L, -2, "kill");
  return 0;
}
