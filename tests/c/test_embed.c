/* test_embed.c -- the public C API (drover.h), as an embedding program uses it. */
#include "drover.h"
#include "tap.h"

#include <lauxlib.h>
#include <limits.h>

static int host_nop(lua_State *L) { return 0; }

/* Every call that runs Lua on an engine drover_open could not set up fails
 * the same way: DROVER_ELOAD and drover_open's own one-line message. */
static void check_refused(drover *D, const char *want) {
  lua_State *L = drover_lua(D);
  char *out = (char *)"untouched";
  const char *argv[] = {"x.lua"};
  CHECK_STR(drover_errmsg(D), want);
  CHECK(strchr(drover_errmsg(D), '\n') == NULL);
  CHECK(drover_dostring(D, "return 1", "=t") == DROVER_ELOAD);
  CHECK_STR(drover_errmsg(D), want);
  CHECK(drover_dofile(D, "/nonexistent/x.lua", 1, argv) == DROVER_ELOAD);
  CHECK_STR(drover_errmsg(D), want);
  CHECK(luaL_loadstring(L, "return ...") == LUA_OK);
  lua_pushinteger(L, 1);
  CHECK(drover_call(D, 1) == DROVER_ELOAD);
  CHECK(lua_gettop(L) == 0); /* the function and its argument were popped */
  CHECK(drover_register(D, "nop", host_nop, NULL) == DROVER_ELOAD);
  CHECK(drover_backend_load(D, "local") == DROVER_ELOAD);
  CHECK_STR(drover_errmsg(D), want);
  CHECK(drover_backend_call(D, "local", NULL, "list", NULL, &out) == DROVER_ELOAD);
  CHECK(out == NULL);
  CHECK(drover_exec(D, "/nonexistent/wf.lua", NULL, &out) == DROVER_ELOAD);
  CHECK(out == NULL);
  CHECK(drover_start(D, "return 1", "=t") == DROVER_ELOAD);
  CHECK_STR(drover_errmsg(D), want);
  /* the loop exists and has nothing to do */
  CHECK(drover_loop(D) != NULL);
  CHECK(drover_step(D) == 0);
}

static void test_missing_library(void) {
  char dir[] = "/tmp/drover-embed-lib-XXXXXX", want[256];
  drover_options o;
  drover *D;
  memset(&o, 0, sizeof o);
  /* the option */
  o.lua_dir = "/nonexistent";
  D = drover_open(&o);
  CHECK(D != NULL);
  check_refused(D, "drover_open: Lua library not found in /nonexistent (set lua_dir or DROVER_LUA_DIR)");
  if (tap__failed_in_child) return;
  drover_close(D);
  /* a directory that exists but holds no drover/init.lua */
  CHECK(mkdtemp(dir) != NULL);
  o.lua_dir = dir;
  D = drover_open(&o);
  snprintf(want, sizeof want, "drover_open: Lua library not found in %s (set lua_dir or DROVER_LUA_DIR)", dir);
  check_refused(D, want);
  if (tap__failed_in_child) return;
  drover_close(D);
  rmdir(dir);
  /* $DROVER_LUA_DIR, when the option is NULL */
  setenv("DROVER_LUA_DIR", "/nonexistent/env", 1);
  D = drover_open(NULL);
  check_refused(D, "drover_open: Lua library not found in /nonexistent/env (set lua_dir or DROVER_LUA_DIR)");
  if (tap__failed_in_child) return;
  drover_close(D);
  unsetenv("DROVER_LUA_DIR");
}

/* lua_dir given, or found through $LUA_PATH: drover.config has both
 * directories made absolute (the backends next to the Lua library). */
static void test_found_library(void) {
  const char *root = getenv("DROVER_ROOT");
  char lua_dir[PATH_MAX], backends[PATH_MAX + 16], rel[PATH_MAX + 16], path[2 * PATH_MAX];
  drover_options o;
  drover *D;
  lua_State *L;
  if (root == NULL || !*root) root = ".";
  snprintf(rel, sizeof rel, "%s/lua", root);
  CHECK(realpath(rel, lua_dir) != NULL);
  snprintf(rel, sizeof rel, "%s/backends", root);
  CHECK(realpath(rel, backends) != NULL);
#ifdef DRV_PREFIX
  /* an installed drover in the compiled-in prefix comes before the Lua path */
  snprintf(rel, sizeof rel, "%s/share/drover/lua/drover/init.lua", DRV_PREFIX);
  if (access(rel, R_OK) == 0) {
    snprintf(rel, sizeof rel, "%s/share/drover/lua", DRV_PREFIX);
    CHECK(realpath(rel, lua_dir) != NULL);
    snprintf(rel, sizeof rel, "%s/share/drover/backends", DRV_PREFIX);
    if (realpath(rel, backends) == NULL) snprintf(backends, sizeof backends, "%s", rel);
  }
#endif
  /* through the Lua path: its first drover/init.lua */
  unsetenv("DROVER_LUA_DIR");
  unsetenv("LUA_PATH_5_4");
  snprintf(path, sizeof path, "/nonexistent/?.lua;%s/lua/?/init.lua;;", root);
  setenv("LUA_PATH", path, 1);
  D = drover_open(NULL);
  CHECK_STR(drover_errmsg(D), "");
  L = drover_lua(D);
  CHECK(drover_dostring(D, "local c = require 'drover.config'; LUA_DIR, BACKENDS = c.lua_dir, c.backends_dir",
                        "=t") == DROVER_OK);
  lua_getglobal(L, "LUA_DIR");
  lua_getglobal(L, "BACKENDS");
  CHECK_STR(lua_tostring(L, -2), lua_dir);
  CHECK_STR(lua_tostring(L, -1), backends);
  lua_pop(L, 2);
  drover_close(D);
  /* the option wins over a $DROVER_LUA_DIR that is wrong */
  setenv("DROVER_LUA_DIR", "/nonexistent/env", 1);
  memset(&o, 0, sizeof o);
  o.lua_dir = lua_dir;
  D = drover_open(&o);
  CHECK_STR(drover_errmsg(D), "");
  CHECK(drover_backend_load(D, "local") == DROVER_OK);
  drover_close(D);
}

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
  /* an error object that is not a string: its __tostring, else its type */
  CHECK(drover_dostring(D, "error(setmetatable({}, { __tostring = function() return 'custom object' end }))",
                        "=obj") == DROVER_ERUN);
  CHECK(strncmp(drover_errmsg(D), "custom object", 13) == 0);
  CHECK(drover_dostring(D, "error({})", "=obj") == DROVER_ERUN);
  CHECK(strncmp(drover_errmsg(D), "table: ", 7) == 0);
  CHECK(drover_dostring(D, "error(setmetatable({}, { __tostring = function() error('no') end }))",
                        "=obj") == DROVER_ERUN);
  CHECK_STR(drover_errmsg(D), "(error object could not be converted to a string)");
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
      {"a Lua library that is not there: one line from drover_open, DROVER_ELOAD after", test_missing_library},
      {"the Lua library from lua_dir or the Lua path, with the backends next to it", test_found_library},
      {"dostring runs code inside the scheduler", test_dostring_ok},
      {"errors carry file:line and a traceback", test_dostring_errors},
      {"NULL and invalid arguments give errors, not crashes", test_null_arguments},
      {"dofile sets arg and passes arguments", test_dofile_args},
      {"drover_call runs a function and its tasks", test_call_tasks},
      {"a host-owned loop is shared", test_host_loop},
      {NULL, NULL}};
  return tap_run(tests, 30);
}
