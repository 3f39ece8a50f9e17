/*
 * sched.c -- tasks: Lua coroutines scheduled on the engine's libuv loop.
 *
 * A task is a coroutine plus a small record (drv_task, a full userdata that
 * is also the handle Lua code holds).  A task is in exactly one of these
 * places at a time:
 *
 *   run queue   ready to be resumed (just spawned, or woken by a primitive);
 *   waiting     suspended in drv__await until a libuv callback wakes it;
 *   running     on the C stack right now, inside lua_resume;
 *   finished    done, failed or cancelled; results kept for join().
 *
 * Every resume happens from one place, the run queue's idle callback, never
 * from inside a primitive's own callback.  That keeps libcurl and libuv
 * callbacks short and never re-entered from Lua (curl refuses multi calls
 * made from inside its callbacks), and it makes the order of wake-ups easy
 * to reason about: first woken, first resumed.
 *
 * Live tasks are anchored in a registry table keyed by their thread, so a
 * task nobody holds a handle to still runs to the end; the same table tells
 * a primitive whether the calling thread is a task (drv__current_task).
 */
#include "drover_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DRV_TASK_MT "drover.task"

enum { T_READY, T_RUNNING, T_WAITING, T_DONE, T_FAILED, T_CANCELLED };
static const char *const drv__state_names[] = {"ready",  "running", "waiting",
                                               "done",   "failed",  "cancelled"};

/* uservalues of a task userdata */
enum { UV_THREAD = 1, UV_RESULT = 2, UV_TRACE = 3, UV_COUNT = 3 };

typedef struct drv_join drv_join;

/* The tasks one blocking drover.run waits for: its own task and every task
 * spawned from inside them (a task spawned outside any task, by a callback,
 * joins the run the loop is in).  Not every task on the engine: a host may
 * keep tasks of its own alive (drover_start), and a call must not wait for
 * those.  Tasks and the run each hold a reference, since either may end
 * first (the run raises on deadlock; the engine may close with tasks alive). */
struct drv_group {
  int live; /* tasks of the group not yet finished */
  int refs;
};

struct drv_task {
  drv_engine *E;
  lua_State *co;
  int state;
  int nargs;                 /* values on co's stack for the next resume */
  int base;                  /* stack top of the C function that awaited */
  drv_task *next;            /* run queue link */
  drv_wait *wait;            /* the wait it is suspended on, if any */
  lua_KFunction k;           /* the awaiting primitive's own continuation */
  lua_KContext kctx;
  drv_join *joiners;         /* waits to wake when this task finishes */
  drv_group *group;          /* the blocking run waiting for it, if any */
  unsigned long id;
  int started;
  int cancel_requested;
  int cancel_raised;
  int error_observed;
};

struct drv_join {
  drv_wait wait;
  drv_task *target;
  drv_join *next;
};

static const char drv__live_key = 'L';  /* registry: thread -> task userdata */
static const char drv__sched_key = 'S'; /* registry: the scheduler's scratch thread */
static unsigned long drv__next_id = 1;

/* ---- bookkeeping ---------------------------------------------------------- */

static void drv__group_unref(drv_group *g) {
  if (--g->refs == 0) free(g);
}

/* t finished (or is being collected unfinished): it no longer counts. */
static void drv__group_leave(drv_task *t) {
  if (t->group == NULL) return;
  t->group->live--;
  drv__group_unref(t->group);
  t->group = NULL;
}

static lua_State *drv__scratch(lua_State *L) {
  lua_State *S;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__sched_key);
  S = lua_tothread(L, -1);
  lua_pop(L, 1);
  return S;
}

/* Push the task userdata for thread co onto L, or nil. */
static int drv__push_live(lua_State *L, lua_State *co) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__live_key);
  if (!lua_istable(L, -1)) { lua_pop(L, 1); lua_pushnil(L); return LUA_TNIL; }
  if (!lua_pushthread(co)) { /* co is not the main thread */ }
  else { lua_pop(co, 1); lua_pop(L, 1); lua_pushnil(L); return LUA_TNIL; }
  lua_xmove(co, L, 1);
  lua_rawget(L, -2);
  lua_remove(L, -2);
  return lua_type(L, -1);
}

drv_task *drv__current_task(lua_State *L) {
  drv_task *t = NULL;
  if (drv__push_live(L, L) == LUA_TUSERDATA) t = (drv_task *)lua_touserdata(L, -1);
  lua_pop(L, 1);
  return t;
}

static void drv__runq_idle_cb(uv_idle_t *h);

static void drv__enqueue(drv_task *t) {
  drv_engine *E = t->E;
  t->state = T_READY;
  t->next = NULL;
  if (E->runq_tail) E->runq_tail->next = t; else E->runq_head = t;
  E->runq_tail = t;
  if (!uv_is_active((uv_handle_t *)&E->runq_idle))
    uv_idle_start(&E->runq_idle, drv__runq_idle_cb);
}

/* ---- waits ----------------------------------------------------------------- */

int drv__can_wait(lua_State *L) {
  drv_engine *E = drv__engine(L);
  if (drv__current_task(L) != NULL) return lua_isyieldable(L);
  return E->loop_depth == 0;
}

void drv__wait_init(drv_wait *w, lua_State *L) {
  drv_engine *E = drv__engine(L);
  memset(w, 0, sizeof *w);
  w->E = E;
  w->L = L;
  w->task = drv__current_task(L);
  if (w->task) {
    if (!lua_isyieldable(L))
      luaL_error(L, "drover: cannot wait across a C-call boundary (a metamethod, "
                    "an iterator or a callback called from C); move the call out of it");
  } else if (E->loop_depth > 0) {
    luaL_error(L, "drover: cannot wait inside a coroutine drover does not manage; "
                  "use drover.spawn instead of coroutine.create/wrap");
  }
}

lua_State *drv__wait_stack(drv_wait *w) {
  luaL_checkstack(w->L, 8, "drover: wake");
  return w->L;
}

void drv__wake(drv_wait *w, int nres) {
  drv_engine *E = w->E;
  w->done = 1;
  w->nres = nres;
  if (w->task) {
    drv_task *t = w->task;
    t->wait = NULL;
    t->nargs = nres;
    drv__enqueue(t);
  } else {
    E->blocking_done = 1;
    E->blocking_nres = nres;
    /* The blocked caller sits in uv_run(UV_RUN_ONCE).  A wake from the
     * timers phase would otherwise be followed by a poll that can block
     * forever while any other fd is watched: stop this iteration. */
    uv_stop(E->loop);
  }
}

static int drv__await_k(lua_State *L, int status, lua_KContext ctx) {
  drv_task *t = (drv_task *)ctx;
  if (t->cancel_requested && !t->cancel_raised) {
    t->cancel_raised = 1;
    /* exactly "cancelled", no position: callers compare against it */
    lua_pushliteral(L, "cancelled");
    return lua_error(L);
  }
  if (t->k) {
    lua_KFunction k = t->k;
    t->k = NULL;
    return k(L, status, t->kctx);
  }
  return lua_gettop(L) - t->base;
}

int drv__awaitk(lua_State *L, drv_wait *w, lua_KFunction k, lua_KContext kctx) {
  drv_engine *E = w->E;
  if (w->task) {
    drv_task *t = w->task;
    t->wait = w;
    t->k = k;
    t->kctx = kctx;
    t->base = lua_gettop(L);
    t->state = T_WAITING;
    return lua_yieldk(L, 0, (lua_KContext)t, drv__await_k);
  }
  /* Not a task: run the loop right here until the wait is woken.  Only one
   * such wait can exist at a time (drv__wait_init refuses nesting). */
  {
    int base = lua_gettop(L);
    E->blocking_done = 0;
    E->blocking_nres = 0;
    while (!E->blocking_done) {
      if (drv__run_once(E) == 0 && !E->blocking_done && E->runq_head == NULL)
        return luaL_error(L, "drover: deadlock: waiting for an operation that can never finish");
    }
    (void)base;
    if (k) return k(L, LUA_YIELD, kctx);
    return E->blocking_nres;
  }
}

int drv__await(lua_State *L, drv_wait *w) { return drv__awaitk(L, w, NULL, 0); }

/* ---- finishing ------------------------------------------------------------ */

static void drv__wake_joiners(drv_task *t) {
  drv_join *j = t->joiners;
  t->joiners = NULL;
  while (j) {
    drv_join *next = j->next;
    drv__wake(&j->wait, 0);
    free(j);
    j = next;
  }
}

/* The task userdata is at the top of S.  Record the outcome of lua_resume. */
static void drv__finish(lua_State *S, drv_task *t, int status, int nres) {
  lua_State *co = t->co;
  int ud = lua_gettop(S);
  if (status == LUA_OK) {
    int i;
    t->state = T_DONE;
    lua_createtable(S, nres, 1);
    lua_xmove(co, S, nres);
    for (i = nres; i >= 1; i--) lua_rawseti(S, ud + 1, i);
    lua_pushinteger(S, nres);
    lua_setfield(S, -2, "n");
    lua_setiuservalue(S, ud, UV_RESULT);
  } else {
    const char *msg;
    t->state = t->cancel_requested ? T_CANCELLED : T_FAILED;
    lua_xmove(co, S, 1); /* the error value */
    msg = lua_tostring(S, -1);
    luaL_traceback(S, co, msg ? msg : "(error object is not a string)", 0);
    lua_setiuservalue(S, ud, UV_TRACE);
    lua_setiuservalue(S, ud, UV_RESULT);
  }
  /* Release the coroutine: results are kept in the userdata. */
  lua_rawgetp(S, LUA_REGISTRYINDEX, &drv__live_key);
  lua_getiuservalue(S, ud, UV_THREAD);
  lua_pushnil(S);
  lua_rawset(S, -3);
  lua_pop(S, 1);
  lua_pushnil(S);
  lua_setiuservalue(S, ud, UV_THREAD);
  t->co = NULL;
  t->E->live_tasks--;
  drv__group_leave(t);
  drv__wake_joiners(t);
}

static void drv__resume(drv_engine *E, drv_task *t) {
  lua_State *S = drv__scratch(E->L);
  lua_State *co = t->co;
  int status, nres = 0;
  lua_rawgetp(S, LUA_REGISTRYINDEX, &drv__live_key);
  lua_pushthread(co);
  lua_xmove(co, S, 1);
  lua_rawget(S, -2);
  lua_remove(S, -2); /* S: ... task-userdata (anchors the task during resume) */

  if (t->cancel_requested && !t->started) {
    /* Cancelled before it ever ran: finish without running it. */
    lua_settop(co, 0);
    lua_pushliteral(co, "cancelled");
    t->cancel_raised = 1;
    drv__finish(S, t, LUA_ERRRUN, 0);
    lua_pop(S, 1);
    return;
  }

  t->state = T_RUNNING;
  t->started = 1;
  status = lua_resume(co, S, t->nargs, &nres);
  t->nargs = 0;
  if (status == LUA_YIELD) {
    if (t->wait == NULL && t->state == T_RUNNING) {
      /* A plain coroutine.yield() (or drover.yield()) inside a task:
       * give others a turn and come back. */
      lua_pop(co, nres);
      drv__enqueue(t);
    } else if (t->state == T_RUNNING) {
      t->state = T_WAITING;
    }
  } else {
    drv__finish(S, t, status, nres);
  }
  lua_pop(S, 1);
}

static void drv__runq_idle_cb(uv_idle_t *h) {
  drv_engine *E = (drv_engine *)h->data;
  /* Resume only what was queued when we started, so a task that keeps
   * yielding cannot starve I/O. */
  drv_task *last = E->runq_tail;
  while (E->runq_head) {
    drv_task *t = E->runq_head;
    E->runq_head = t->next;
    if (E->runq_head == NULL) E->runq_tail = NULL;
    t->next = NULL;
    drv__resume(E, t);
    if (t == last) break;
  }
  if (E->runq_head == NULL) uv_idle_stop(&E->runq_idle);
}

/* ---- Lua API: spawn, handles ---------------------------------------------- */

static drv_task *drv__check_task(lua_State *L, int idx, const char *fname) {
  drv_task *t = (drv_task *)luaL_testudata(L, idx, DRV_TASK_MT);
  if (t == NULL) drv__argerror(L, fname, "self", "task handle", idx);
  return t;
}

static int drv__spawn_impl(lua_State *L, int fidx, const char *fname) {
  drv_engine *E = drv__engine(L);
  int top = lua_gettop(L), nargs = top - fidx;
  drv_task *t;
  lua_State *co;
  if (!lua_isfunction(L, fidx) && !luaL_getmetafield(L, fidx, "__call"))
    return drv__argerror(L, fname, "fn", "function", fidx);
  if (lua_gettop(L) > top) lua_settop(L, top); /* drop the __call metafield */
  t = (drv_task *)lua_newuserdatauv(L, sizeof *t, UV_COUNT);
  memset(t, 0, sizeof *t);
  t->E = E;
  t->id = drv__next_id++;
  luaL_setmetatable(L, DRV_TASK_MT);
  co = lua_newthread(L);
  t->co = co;
  lua_setiuservalue(L, -2, UV_THREAD);
  /* move fn and args onto the coroutine */
  lua_pushvalue(L, fidx);
  lua_xmove(L, co, 1);
  if (nargs > 0) {
    int i;
    for (i = 1; i <= nargs; i++) lua_pushvalue(L, fidx + i);
    lua_xmove(L, co, nargs);
  }
  t->nargs = nargs;
  /* anchor: live[thread] = task */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__live_key);
  lua_getiuservalue(L, -2, UV_THREAD);
  lua_pushvalue(L, -3);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  E->live_tasks++;
  {
    drv_task *parent = drv__current_task(L);
    t->group = parent ? parent->group : E->run_group;
    if (t->group) {
      t->group->live++;
      t->group->refs++;
    }
  }
  drv__enqueue(t);
  return 1;
}

static int drv__l_spawn(lua_State *L) { return drv__spawn_impl(L, 1, "drover.spawn"); }

/* Push the outcome of a finished task: results (returns count), or raise. */
static int drv__push_outcome(lua_State *L, drv_task *t, int idx, int raise) {
  if (t->state == T_DONE) {
    lua_Integer n, i;
    int r;
    lua_getiuservalue(L, idx, UV_RESULT);
    r = lua_gettop(L);
    lua_getfield(L, r, "n");
    n = lua_tointeger(L, -1);
    lua_pop(L, 1);
    luaL_checkstack(L, (int)n + 2, "drover: too many results");
    if (!raise) lua_pushboolean(L, 1);
    for (i = 1; i <= n; i++) lua_rawgeti(L, r, i);
    lua_remove(L, r);
    return (int)n + (raise ? 0 : 1);
  }
  t->error_observed = 1;
  if (raise) {
    lua_getiuservalue(L, idx, UV_RESULT);
    if (lua_type(L, -1) == LUA_TSTRING) {
      lua_pop(L, 1);
      lua_getiuservalue(L, idx, UV_TRACE);
    }
    return lua_error(L);
  }
  lua_pushboolean(L, 0);
  lua_getiuservalue(L, idx, UV_RESULT);
  lua_getiuservalue(L, idx, UV_TRACE);
  return 3;
}

static void drv__join_cancel(drv_wait *w) {
  /* The joiner was cancelled: unlink it from the target and wake it now. */
  drv_join *j = (drv_join *)w, **pp;
  for (pp = &j->target->joiners; *pp; pp = &(*pp)->next) {
    if (*pp == j) { *pp = j->next; break; }
  }
  drv__wake(&j->wait, 0);
  free(j);
}

static int drv__join_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  /* ctx: 1 = join (raise), 0 = wait (pcall-style). The handle is arg 1. */
  drv_task *t = (drv_task *)lua_touserdata(L, 1);
  return drv__push_outcome(L, t, 1, (int)ctx);
}

static int drv__join_impl(lua_State *L, int raise, const char *fname) {
  drv_task *t = drv__check_task(L, 1, fname);
  drv_join *j;
  lua_settop(L, 1);
  if (t->state >= T_DONE) return drv__push_outcome(L, t, 1, raise);
  if (t->co == L) return luaL_error(L, "%s: a task cannot join itself", fname);
  j = (drv_join *)calloc(1, sizeof *j);
  if (j == NULL) return luaL_error(L, "%s: out of memory", fname);
  drv__wait_init(&j->wait, L); /* may raise: j not linked yet */
  j->wait.cancel = drv__join_cancel;
  j->target = t;
  j->next = t->joiners;
  t->joiners = j;
  return drv__awaitk(L, &j->wait, drv__join_k, (lua_KContext)raise);
}

static int drv__l_join(lua_State *L) { return drv__join_impl(L, 1, "task:join"); }
static int drv__l_wait(lua_State *L) { return drv__join_impl(L, 0, "task:wait"); }

/* Request cancellation.  A waiting task's operation is stopped (its cancel
 * hook runs) and the task raises "cancelled" where it waited; a task that
 * never ran finishes at once.  Returns true if the request was new. */
int drv__task_cancel(drv_task *t) {
  if (t->state >= T_DONE || t->cancel_requested) return 0;
  t->cancel_requested = 1;
  if (t->state == T_WAITING && t->wait && t->wait->cancel) {
    t->wait->cancel(t->wait);
  }
  return 1;
}

static int drv__l_cancel(lua_State *L) {
  drv_task *t = drv__check_task(L, 1, "task:cancel");
  lua_pushboolean(L, drv__task_cancel(t));
  return 1;
}

static int drv__l_status(lua_State *L) {
  drv_task *t = drv__check_task(L, 1, "task:status");
  lua_pushstring(L, drv__state_names[t->state]);
  return 1;
}

static int drv__l_index(lua_State *L) {
  drv_task *t = drv__check_task(L, 1, "task");
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "id") == 0) { lua_pushinteger(L, (lua_Integer)t->id); return 1; }
  luaL_getmetatable(L, DRV_TASK_MT);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

static int drv__l_tostring(lua_State *L) {
  drv_task *t = drv__check_task(L, 1, "task");
  lua_pushfstring(L, "drover.task(%d, %s)", (int)t->id, drv__state_names[t->state]);
  return 1;
}

static int drv__l_gc(lua_State *L) {
  drv_task *t = (drv_task *)lua_touserdata(L, 1);
  drv__group_leave(t); /* still alive: the engine is closing */
  if (t->state == T_FAILED && !t->error_observed && !t->E->closing) {
    lua_getiuservalue(L, 1, UV_TRACE);
    drv__log(t->E, "error", "drover: task %lu failed and nobody joined it: %s", t->id,
             lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
    lua_pop(L, 1);
  }
  return 0;
}

/* drover.current() -> the running task's handle, or nil outside tasks */
static int drv__l_current(lua_State *L) {
  drv__push_live(L, L);
  return 1;
}

/* drover.yield(): let other ready tasks run. */
static int drv__l_yield(lua_State *L) {
  if (drv__current_task(L) == NULL) return 0;
  return lua_yield(L, 0);
}

/* drover.run(fn, ...): run fn as a task until it and the tasks it spawned
 * (its group, above) finish.  Inside a task it is spawn + join.
 * drover.run() with no function drains: it waits for every task. */
int drv__run(lua_State *L) {
  drv_engine *E = drv__engine(L);
  drv_task *t;
  drv_group *g, *outer;
  int n;
  if (!lua_isnoneornil(L, 1) && drv__current_task(L) != NULL) {
    drv__spawn_impl(L, 1, "drover.run");
    lua_replace(L, 1);
    lua_settop(L, 1);
    return drv__join_impl(L, 1, "drover.run");
  }
  if (E->loop_depth > 0)
    return luaL_error(L, "drover.run: called from inside a callback or a coroutine drover "
                         "does not manage");
  if (lua_isnoneornil(L, 1)) {
    while (E->live_tasks > 0) {
      if (drv__run_once(E) == 0 && E->runq_head == NULL && E->live_tasks > 0)
        return luaL_error(L, "drover.run: deadlock: %d task(s) wait for something that can "
                             "never happen", E->live_tasks);
    }
    return 0;
  }
  drv__spawn_impl(L, 1, "drover.run"); /* may raise: nothing to undo yet */
  t = (drv_task *)lua_touserdata(L, -1);
  g = (drv_group *)calloc(1, sizeof *g);
  if (g == NULL) return luaL_error(L, "drover.run: out of memory");
  drv__group_leave(t); /* (none: spawned outside any task and any run) */
  t->group = g;
  g->live = 1;
  g->refs = 2; /* the task's and this run's */
  outer = E->run_group;
  E->run_group = g;
  while (g->live > 0) {
    if (drv__run_once(E) == 0 && E->runq_head == NULL && g->live > 0) {
      n = g->live;
      E->run_group = outer;
      drv__group_unref(g);
      return luaL_error(L, "drover.run: deadlock: %d task(s) wait for something that can "
                           "never happen", n);
    }
  }
  E->run_group = outer;
  drv__group_unref(g);
  lua_replace(L, 1);
  lua_settop(L, 1);
  return drv__push_outcome(L, t, 1, 1);
}

void drv__sched_close(drv_engine *E) {
  if (!uv_is_closing((uv_handle_t *)&E->runq_idle)) uv_close((uv_handle_t *)&E->runq_idle, NULL);
  E->runq_head = E->runq_tail = NULL;
}

/* Metatables and registry tables the scheduler needs; idempotent.  Done
 * when the engine is attached, so drover_dofile can run a script without
 * building the whole drover.core table first. */
void drv__sched_init(lua_State *L) {
  static const luaL_Reg methods[] = {{"join", drv__l_join},     {"wait", drv__l_wait},
                                     {"cancel", drv__l_cancel}, {"status", drv__l_status},
                                     {NULL, NULL}};
  if (luaL_newmetatable(L, DRV_TASK_MT)) {
    lua_pushcfunction(L, drv__l_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, drv__l_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, drv__l_gc);
    lua_setfield(L, -2, "__gc");
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
  }
  lua_pop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__live_key);
  if (lua_isnil(L, -1)) {
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &drv__live_key);
    lua_newthread(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &drv__sched_key);
  }
  lua_pop(L, 1);
}

int drv__open_sched(lua_State *L) {
  static const luaL_Reg funcs[] = {{"spawn", drv__l_spawn}, {"run", drv__run},
                                   {"current", drv__l_current}, {"yield", drv__l_yield},
                                   {NULL, NULL}};
  drv__sched_init(L);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
