/* test_embed.c -- the public C API (drover.h), as an embedding program uses it. */
#include "drover.h"
#include "tap.h"

#include <lauxlib.h>

static void test_open_close(void) {
  drover *D = drover_open(NULL);
  CHECK(D != NULL);
  CHECK_STR(drover_errmsg(D), "");
  CHECK(drover_lua(D) != NULL);
  CHECK(drover_loop(D) != NULL);
  drover_close(D);
  drover_close(NULL); /* ignored */
}

static void test_dostring_ok(void) {
  drover *D = drover_open(NULL);
  lua_State *L = drover_lua(D);
  if (drover_dostring(D, "local d = require 'drover'; d.sleep(0.01); X = 6 * 7", "t") != DROVER_OK) fprintf(stderr, "%s\n", drover_errmsg(D));
  CHECK(*drover_errmsg(D) == 0);
  lua_getglobal(L, "X");
  CHECK(lua_tointeger(L, -1) == 42);
  lua_pop(L, 1);
  drover_close(D);
}

static void test_dostring_errors(void) {
  drover *D = drover_open(NULL);
  CHECK(drover_dostring(D, "error('bad thing')", "=chunk") == DROVER_ERUN);
  CHECK(strstr(drover_errmsg(D), "chunk:1: bad thing") != NULL);
  CHECK(strstr(drover_errmsg(D), "stack traceback") != NULL);
  CHECK(drover_dostring(D, "local = 1", "=chunk") == DROVER_ELOAD);
  CHECK(strstr(drover_errmsg(D), "chunk:1:") != NULL);
  /* the engine stays usable after errors */
  CHECK(drover_dostring(D, "return 1", "ok") == DROVER_OK);
  CHECK_STR(drover_errmsg(D), "");
  drover_close(D);
}

static void test_null_arguments(void) {
  drover *D = drover_open(NULL);
  CHECK(drover_dostring(NULL, "x", "x") == DROVER_EARG);
  CHECK(drover_dostring(D, NULL, "x") == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "code is NULL") != NULL);
  CHECK(drover_dofile(NULL, "x", 0, NULL) == DROVER_EARG);
  CHECK(drover_dofile(D, NULL, 0, NULL) == DROVER_EARG);
  CHECK(drover_dofile(D, "x", 2, NULL) == DROVER_EARG);
  CHECK(drover_call(NULL, 0) == DROVER_EARG);
  CHECK(drover_call(D, 0) == DROVER_EARG); /* nothing on the stack */
  CHECK(drover_call(D, -1) == DROVER_EARG);
  CHECK(drover_lua(NULL) == NULL);
  CHECK(drover_loop(NULL) == NULL);
  CHECK(strstr(drover_errmsg(NULL), "NULL") != NULL);
  drover_close(D);
}

static void test_dofile_args(void) {
  drover *D = drover_open(NULL);
  lua_State *L = drover_lua(D);
  char path[] = "/tmp/drover-embed-XXXXXX";
  const char *argv[] = {"script", "a", "b"};
  int fd = mkstemp(path);
  FILE *f = fdopen(fd, "w");
  fputs("local x, y = ...\nRESULT = arg[0] .. ':' .. x .. y .. #arg\n", f);
  fclose(f);
  argv[0] = path;
  CHECK(drover_dofile(D, path, 3, argv) == DROVER_OK);
  lua_getglobal(L, "RESULT");
  CHECK(strstr(lua_tostring(L, -1), ":ab2") != NULL);
  unlink(path);
  CHECK(drover_dofile(D, "/nonexistent/file.lua", 0, NULL) == DROVER_ELOAD);
  CHECK(strstr(drover_errmsg(D), "/nonexistent/file.lua") != NULL);
  drover_close(D);
}

static void test_call_tasks(void) {
  drover *D = drover_open(NULL);
  lua_State *L = drover_lua(D);
  CHECK(luaL_loadstring(L, "local d = require 'drover'\n"
                           "local n = ...\n"
                           "for i = 1, n do d.spawn(function() d.sleep(0.01); COUNT = (COUNT or 0) + 1 end) end") == LUA_OK);
  lua_pushinteger(L, 25);
  CHECK(drover_call(D, 1) == DROVER_OK);
  lua_getglobal(L, "COUNT");
  CHECK(lua_tointeger(L, -1) == 25); /* drover_call waits for spawned tasks */
  drover_close(D);
}

static int timer_fired;
static void on_host_timer(uv_timer_t *t) { timer_fired++; uv_close((uv_handle_t *)t, NULL); }

static void test_host_loop(void) {
  uv_loop_t loop;
  uv_timer_t t;
  drover_options o;
  drover *D;
  memset(&o, 0, sizeof o);
  uv_loop_init(&loop);
  o.loop = &loop;
  D = drover_open(&o);
  CHECK(drover_loop(D) == &loop);
  /* a host timer fires while drover runs a task on the shared loop */
  uv_timer_init(&loop, &t);
  uv_timer_start(&t, on_host_timer, 5, 0);
  CHECK(drover_dostring(D, "require('drover').sleep(0.05)", "t") == DROVER_OK);
  CHECK(timer_fired == 1);
  drover_close(D);
  uv_run(&loop, UV_RUN_NOWAIT);
  CHECK(uv_loop_close(&loop) == 0);
}

int main(void) {
  static const tap_test tests[] = {
      {"open and close", test_open_close},
      {"dostring runs code inside the scheduler", test_dostring_ok},
      {"errors carry file:line and a traceback", test_dostring_errors},
      {"NULL and invalid arguments give errors, not crashes", test_null_arguments},
      {"dofile sets arg and passes arguments", test_dofile_args},
      {"drover_call runs a function and its tasks", test_call_tasks},
      {"a host-owned loop is shared", test_host_loop},
      {NULL, NULL}};
  return tap_run(tests, 30);
}
