/*
 * event.c -- drover.event(): a flag tasks can wait on (asyncio.Event).
 *
 * The one synchronisation primitive the Lua side builds the rest on:
 * semaphores for tag concurrency limits, "wait until the flow is
 * cancelled", and so on.  ev:wait() suspends until ev:set(); set() wakes
 * every waiter and stays set until clear().
 */
#include "drover_int.h"

#include <stdlib.h>
#include <string.h>

#define DRV_EVENT_MT "drover.event"

typedef struct drv_evwait drv_evwait;
struct drv_evwait {
  drv_wait wait;
  drv_evwait **head;   /* list it is on, for unlinking on cancel */
  drv_evwait *next;
};

typedef struct {
  int is_set;
  drv_evwait *waiters;
} drv_event;

static drv_event *drv__check_event(lua_State *L, const char *fname) {
  drv_event *ev = (drv_event *)luaL_testudata(L, 1, DRV_EVENT_MT);
  if (ev == NULL) drv__argerror(L, fname, "self", "event", 1);
  return ev;
}

static void drv__evwait_cancel(drv_wait *w) {
  drv_evwait *e = (drv_evwait *)w, **pp;
  for (pp = e->head; *pp; pp = &(*pp)->next) {
    if (*pp == e) { *pp = e->next; break; }
  }
  drv__wake(&e->wait, 0);
  free(e);
}

static int drv__l_event_wait(lua_State *L) {
  drv_event *ev = drv__check_event(L, "event:wait");
  drv_evwait *e;
  drv_wait w;
  if (ev->is_set) return 0;
  drv__wait_init(&w, L);
  e = (drv_evwait *)calloc(1, sizeof *e);
  if (e == NULL) return luaL_error(L, "event:wait: out of memory");
  e->wait = w;
  e->wait.cancel = drv__evwait_cancel;
  e->head = &ev->waiters;
  e->next = ev->waiters;
  ev->waiters = e;
  lua_settop(L, 0);
  return drv__await(L, &e->wait);
}

static int drv__l_event_set(lua_State *L) {
  drv_event *ev = drv__check_event(L, "event:set");
  drv_evwait *e = ev->waiters;
  ev->is_set = 1;
  ev->waiters = NULL;
  while (e) {
    drv_evwait *next = e->next;
    drv__wake(&e->wait, 0);
    free(e);
    e = next;
  }
  return 0;
}

static int drv__l_event_clear(lua_State *L) {
  drv__check_event(L, "event:clear")->is_set = 0;
  return 0;
}

static int drv__l_event_is_set(lua_State *L) {
  lua_pushboolean(L, drv__check_event(L, "event:is_set")->is_set);
  return 1;
}

static int drv__l_event_gc(lua_State *L) {
  /* A waiting task keeps the event alive through its own stack, so while
   * the engine runs this only happens with no waiters left.  When the Lua
   * state closes with tasks still waiting, their waiters are freed here
   * without waking anyone: nothing will resume them, and the task's gc
   * does not touch its wait. */
  drv_event *ev = (drv_event *)lua_touserdata(L, 1);
  drv_evwait *e = ev->waiters;
  ev->waiters = NULL;
  while (e) {
    drv_evwait *next = e->next;
    free(e);
    e = next;
  }
  return 0;
}

static int drv__l_event(lua_State *L) {
  drv_event *ev = (drv_event *)lua_newuserdatauv(L, sizeof *ev, 0);
  memset(ev, 0, sizeof *ev);
  luaL_setmetatable(L, DRV_EVENT_MT);
  return 1;
}

int drv__open_event(lua_State *L) {
  static const luaL_Reg methods[] = {{"wait", drv__l_event_wait},
                                     {"set", drv__l_event_set},
                                     {"clear", drv__l_event_clear},
                                     {"is_set", drv__l_event_is_set},
                                     {NULL, NULL}};
  if (luaL_newmetatable(L, DRV_EVENT_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, drv__l_event_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, drv__l_event);
  lua_setfield(L, -2, "event");
  return 0;
}
