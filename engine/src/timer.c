/*
 * timer.c -- drover.sleep and drover.now: the smallest complete wait, in
 * the spirit of OpenResty's ngx_http_lua_sleep.c.
 */
#include "drover_int.h"

#include <stdlib.h>

typedef struct {
  drv_wait wait;
  drv_res res;      /* a sleep still pending when the engine closes is freed */
  uv_timer_t timer;
} drv_sleep;

static void drv__sleep_closed(uv_handle_t *h) { free(h->data); }

static void drv__sleep_fire(uv_timer_t *h) {
  drv_sleep *s = (drv_sleep *)h->data;
  drv__res_unlink(&s->res);
  uv_close((uv_handle_t *)h, drv__sleep_closed);
  drv__wake(&s->wait, 0);
}

static void drv__sleep_close_res(drv_res *r) {
  drv_sleep *s = (drv_sleep *)((char *)r - offsetof(drv_sleep, res));
  uv_close((uv_handle_t *)&s->timer, drv__sleep_closed);
}

static void drv__sleep_cancel(drv_wait *w) {
  drv_sleep *s = (drv_sleep *)w;
  uv_timer_stop(&s->timer);
  drv__sleep_fire(&s->timer);
}

/* drover.sleep(seconds) */
static int drv__l_sleep(lua_State *L) {
  drv_sleep *s;
  double secs;
  if (lua_type(L, 1) != LUA_TNUMBER) return drv__argerror(L, "drover.sleep", "seconds", "number", 1);
  secs = lua_tonumber(L, 1);
  if (!(secs >= 0)) return luaL_error(L, "drover.sleep: bad argument 'seconds' (must be >= 0)");
  {
    drv_wait w;
    drv__wait_init(&w, L); /* may raise: do it before anything is allocated */
    s = (drv_sleep *)calloc(1, sizeof *s);
    if (s == NULL) return luaL_error(L, "drover.sleep: out of memory");
    s->wait = w;
  }
  s->wait.cancel = drv__sleep_cancel;
  uv_timer_init(s->wait.E->loop, &s->timer);
  s->timer.data = s;
  drv__res_link(s->wait.E, &s->res, drv__sleep_close_res);
  uv_timer_start(&s->timer, drv__sleep_fire, (uint64_t)(secs * 1000.0 + 0.5), 0);
  lua_settop(L, 0);
  return drv__await(L, &s->wait);
}

/* drover.now() -> monotonic seconds, nanosecond resolution */
static int drv__l_now(lua_State *L) {
  lua_pushnumber(L, (double)uv_hrtime() / 1e9);
  return 1;
}

int drv__open_timer(lua_State *L) {
  static const luaL_Reg funcs[] = {{"sleep", drv__l_sleep}, {"now", drv__l_now}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
