/* test_api.c -- the embedding API beyond running scripts: host functions,
 * backend contract calls with JSON, workflow files, a host-driven loop,
 * the log callback, and bad input to each of them. */
#include "drover.h"
#include "tap.h"

#include <lauxlib.h>
#include <time.h>

/* Every directory the tests make is under one made by main, which removes
 * it at the end: the suite leaves nothing in /tmp. */
static char tmp_root[64];

/* A new directory under tmp_root into dir (at least 128 bytes); dir or NULL. */
static char *make_dir(char *dir, size_t size) {
  snprintf(dir, size, "%s/XXXXXX", tmp_root);
  return mkdtemp(dir);
}

/* A fresh store directory per test, so runs of one test never meet another's. */
static drover *open_engine(drover_options *o) {
  static char home[128];
  drover_options local;
  if (make_dir(home, sizeof home) == NULL) return NULL;
  if (o == NULL) {
    memset(&local, 0, sizeof local);
    o = &local;
  }
  o->home = home;
  setenv("DROVER_DAEMON", "0", 1); /* the local backend would start a dashboard daemon */
  return drover_open(o);
}

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (f) {
    fputs(text, f);
    fclose(f);
  }
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- host functions ------------------------------------------------------ */

static int host_add(lua_State *L) {
  int *calls = (int *)drover_host_ud(L);
  (*calls)++;
  lua_pushinteger(L, luaL_checkinteger(L, 1) + luaL_checkinteger(L, 2));
  return 1;
}

static int host_fail(lua_State *L) { return luaL_error(L, "host says no"); }

/* A host function that (wrongly) calls back into its engine: an error, not a crash. */
static int reentrant_rc;
static int host_reenter(lua_State *L) {
  drover *D = (drover *)drover_host_ud(L);
  reentrant_rc = drover_dostring(D, "return 1", "=inner");
  return 0;
}

static void test_register(void) {
  drover *D = open_engine(NULL);
  lua_State *L = drover_lua(D);
  int calls = 0;
  CHECK(drover_register(D, "add", host_add, &calls) == DROVER_OK);
  CHECK(drover_register(D, "fail", host_fail, NULL) == DROVER_OK);
  /* from inside tasks, while other tasks wait */
  CHECK(drover_dostring(D,
                        "local d = require 'drover'\n"
                        "local r = d.all { function() d.sleep(0.01); return d.host.add(1, 2) end,\n"
                        "                  function() return d.host.add(40, 2) end }\n"
                        "SUM = r[1] + r[2]\n"
                        "local ok, err = pcall(d.host.fail)\n"
                        "ERR = err",
                        "=t") == DROVER_OK);
  CHECK(calls == 2);
  lua_getglobal(L, "SUM");
  CHECK(lua_tointeger(L, -1) == 45);
  lua_getglobal(L, "ERR");
  CHECK(strstr(lua_tostring(L, -1), "host says no") != NULL);
  lua_pop(L, 2);
  /* an unknown name is a clear error */
  CHECK(drover_dostring(D, "require('drover').host.nope()", "=t") == DROVER_ERUN);
  CHECK(strstr(drover_errmsg(D), "drover.host.nope: no host function") != NULL);
  /* bad arguments */
  CHECK(drover_register(D, NULL, host_add, NULL) == DROVER_EARG);
  CHECK(drover_register(D, "two words", host_add, NULL) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "Lua identifier") != NULL);
  CHECK(drover_register(D, "x", NULL, NULL) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "fn is NULL") != NULL);
  /* reserved words are not identifiers: drover.host.end would not parse */
  CHECK(drover_register(D, "end", host_add, NULL) == DROVER_EARG);
  CHECK_STR(drover_errmsg(D), "drover_register: bad argument 'name' ('end' is not a Lua identifier: letters, "
                              "digits and _, not starting with a digit, not a reserved word)");
  CHECK(drover_register(D, "while", host_add, NULL) == DROVER_EARG);
  CHECK(drover_register(D, "1st", host_add, NULL) == DROVER_EARG);
  CHECK(drover_register(D, "", host_add, NULL) == DROVER_EARG);
  CHECK(drover_register(D, "end_", host_add, NULL) == DROVER_OK); /* only the word itself */
  CHECK(drover_register(D, "_G1", host_add, NULL) == DROVER_OK);
  CHECK(drover_register(NULL, "x", host_add, NULL) == DROVER_EARG);
  CHECK(drover_host_ud(NULL) == NULL);
  CHECK(drover_register(D, "reenter", host_reenter, D) == DROVER_OK);
  CHECK(drover_dostring(D, "require('drover').host.reenter()", "=t") == DROVER_OK);
  CHECK(reentrant_rc == DROVER_ERUN);
  drover_close(D);
}

/* ---- backends -------------------------------------------------------------- */

static const char *fixture_dir(void) {
  static char dir[4096];
  const char *root = getenv("DROVER_ROOT");
  snprintf(dir, sizeof dir, "%s/tests/conformance/fixture", root && *root ? root : ".");
  return dir;
}

/* package, deploy, run, status (until COMPLETED), logs, list on the local backend */
static void test_local_backend(void) {
  drover *D = open_engine(NULL);
  char args[8192], *out = NULL, id[64] = "";
  double deadline;
  int done = 0;
  CHECK(drover_backend_load(D, "local") == DROVER_OK);
  snprintf(args, sizeof args, "[\"Fixture\", \"fixture_flow\", \"main\", {\"path\": \"%s\"}]", fixture_dir());
  if (drover_backend_call(D, "local", NULL, "package", args, &out) != DROVER_OK)
    fprintf(stderr, "  package: %s\n", drover_errmsg(D));
  CHECK(out != NULL && strstr(out, "\"sha256\"") != NULL);
  {
    /* the package id, from [{"id":"<sha>",...}] */
    char *p = strstr(out, "\"id\":\""), *q;
    CHECK(p != NULL);
    p += 6;
    q = strchr(p, '"');
    CHECK(q != NULL && q - p < 100);
    snprintf(args, sizeof args, "[\"api-ok\", {\"package\": \"%.*s\", \"params\": {\"mode\": \"ok\"}}]",
             (int)(q - p), p);
  }
  drover_free(out);
  CHECK(drover_backend_call(D, "local", NULL, "deploy", args, &out) == DROVER_OK);
  CHECK(strstr(out, "\"api-ok\"") != NULL);
  drover_free(out);
  if (drover_backend_call(D, "local", "{}", "run", "[\"api-ok\", {}]", &out) != DROVER_OK)
    fprintf(stderr, "  run: %s\n", drover_errmsg(D));
  CHECK(out != NULL && out[0] == '[' && out[1] == '"');
  sscanf(out, "[\"%63[^\"]\"", id);
  CHECK(strlen(id) > 0);
  drover_free(out);
  snprintf(args, sizeof args, "[\"%s\"]", id);
  deadline = now() + 120;
  while (!done && now() < deadline) {
    CHECK(drover_backend_call(D, "local", NULL, "status", args, &out) == DROVER_OK);
    done = strstr(out, "\"state\":\"COMPLETED\"") != NULL;
    CHECK(strstr(out, "FAILED") == NULL && strstr(out, "CRASHED") == NULL);
    drover_free(out);
    if (!done) usleep(50000);
  }
  CHECK(done);
  CHECK(drover_backend_call(D, "local", NULL, "logs", args, &out) == DROVER_OK);
  CHECK(strstr(out, "fixture says HELLO") != NULL);
  drover_free(out);
  CHECK(drover_backend_call(D, "local", NULL, "list", NULL, &out) == DROVER_OK);
  CHECK(strstr(out, id) != NULL);
  drover_free(out);
  /* cancel is an operation: of a finished run, the backend's own refusal */
  CHECK(drover_backend_call(D, "local", NULL, "cancel", args, &out) == DROVER_ERUN);
  CHECK(out == NULL);
  CHECK(strstr(drover_errmsg(D), "is COMPLETED: only active runs can be cancelled") != NULL);
  /* an operation's own error is DROVER_ERUN with its message */
  CHECK(drover_backend_call(D, "local", NULL, "run", "[\"no-such\"]", &out) == DROVER_ERUN);
  CHECK(out == NULL);
  CHECK_STR(drover_errmsg(D), "unknown deployment 'no-such'");
  drover_close(D);
}

static void test_backend_bad_input(void) {
  drover *D = open_engine(NULL);
  char dir[128], path[160], *out = (char *)"untouched";
  CHECK(make_dir(dir, sizeof dir) != NULL);
  /* JSON that does not parse, or has the wrong shape */
  CHECK(drover_backend_call(D, "local", NULL, "list", "[1, 2", &out) == DROVER_EARG);
  CHECK(out == NULL);
  CHECK(strstr(drover_errmsg(D), "args_json is not valid JSON") != NULL);
  CHECK(drover_backend_call(D, "local", "{\"a\":", "list", NULL, &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "config_json is not valid JSON") != NULL);
  CHECK(drover_backend_call(D, "local", "[1]", "list", NULL, &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "config_json must be a JSON object") != NULL);
  CHECK(drover_backend_call(D, "local", NULL, "list", "{\"a\": 1}", &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "args_json must be a JSON array") != NULL);
  /* an empty object is not an empty array, nor the reverse */
  CHECK(drover_backend_call(D, "local", NULL, "run", "{}", &out) == DROVER_EARG);
  CHECK_STR(drover_errmsg(D), "drover_backend_call: args_json must be a JSON array");
  CHECK(drover_backend_call(D, "local", "[]", "list", NULL, &out) == DROVER_EARG);
  CHECK_STR(drover_errmsg(D), "drover_backend_call: config_json must be a JSON object");
  CHECK(drover_backend_call(D, "local", NULL, "list", "\"x\"", &out) == DROVER_EARG);
  CHECK_STR(drover_errmsg(D), "drover_backend_call: args_json must be a JSON array");
  CHECK(drover_backend_call(D, "local", NULL, "list", "null", &out) == DROVER_EARG);
  CHECK_STR(drover_errmsg(D), "drover_backend_call: args_json must be a JSON array");
  CHECK(drover_backend_call(D, "local", "{\"1\": 2}", "list", NULL, &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "unknown config key '1'") != NULL);
  CHECK(drover_backend_call(D, "local", "{}", "list", "[]", &out) == DROVER_OK);
  CHECK(out != NULL && out[0] == '[');
  drover_free(out);
  CHECK(drover_exec(D, "/nonexistent/wf.lua", "[]", NULL) == DROVER_EARG);
  CHECK_STR(drover_errmsg(D), "drover_exec: params_json must be a JSON object");
  /* a config key the backend refuses */
  CHECK(drover_backend_call(D, "local", "{\"colour\": \"red\"}", "list", NULL, &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "unknown config key 'colour'") != NULL);
  /* an unknown operation, an unknown backend */
  CHECK(drover_backend_call(D, "local", NULL, "explode", NULL, &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "unknown operation 'explode'") != NULL);
  /* load errors name the backend first: no position inside drover's glue */
  CHECK(drover_backend_call(D, "no_such_backend", NULL, "list", NULL, &out) == DROVER_ELOAD);
  CHECK(strncmp(drover_errmsg(D), "unknown backend 'no_such_backend' (looked in ", 45) == 0);
  CHECK(strchr(drover_errmsg(D), '\n') == NULL);
  CHECK(drover_backend_load(D, "no_such_backend") == DROVER_ELOAD);
  CHECK(strncmp(drover_errmsg(D), "unknown backend 'no_such_backend' (looked in ", 45) == 0);
  CHECK(drover_backend_load(D, "bad name!") == DROVER_ELOAD);
  CHECK_STR(drover_errmsg(D), "drover.orchestrator: bad backend name 'bad name!'");
  /* a backend with a syntax error: file:line */
  snprintf(path, sizeof path, "%s/broken.lua", dir);
  write_file(path, "local drover = require 'drover'\nlocal B = = 1\nreturn B\n");
  CHECK(drover_backend_load(D, path) == DROVER_ELOAD);
  CHECK(strncmp(drover_errmsg(D), "backend '", 9) == 0);
  CHECK(strstr(drover_errmsg(D), "broken.lua:2:") != NULL);
  CHECK(drover_backend_call(D, path, NULL, "list", NULL, &out) == DROVER_ELOAD);
  CHECK(strncmp(drover_errmsg(D), "backend '", 9) == 0);
  CHECK(strstr(drover_errmsg(D), "broken.lua:2:") != NULL);
  /* a backend that is not a backend */
  snprintf(path, sizeof path, "%s/notone.lua", dir);
  write_file(path, "return 42\n");
  CHECK(drover_backend_load(D, path) == DROVER_ELOAD);
  CHECK(strncmp(drover_errmsg(D), "backend '", 9) == 0);
  CHECK(strstr(drover_errmsg(D), "must return a subclass of drover.BaseOrchestrator") != NULL);
  /* a backend that leaves an operation out */
  snprintf(path, sizeof path, "%s/minimal.lua", dir);
  write_file(path, "local B = require('drover').BaseOrchestrator:extend('minimal')\n"
                   "B.backend_name = 'minimal'\n"
                   "function B:list() return { 'a', 'b' } end\n"
                   "return B\n");
  CHECK(drover_backend_call(D, path, NULL, "list", NULL, &out) == DROVER_OK);
  CHECK_STR(out, "[[\"a\",\"b\"]]");
  drover_free(out);
  CHECK(drover_backend_call(D, path, NULL, "run", "[\"x\"]", &out) == DROVER_ENOTIMPL);
  CHECK_STR(drover_errmsg(D), "backend 'minimal' does not implement run");
  /* NULL arguments */
  CHECK(drover_backend_call(NULL, "local", NULL, "list", NULL, &out) == DROVER_EARG);
  CHECK(drover_backend_call(D, NULL, NULL, "list", NULL, &out) == DROVER_EARG);
  CHECK(drover_backend_call(D, "", NULL, "list", NULL, &out) == DROVER_EARG);
  CHECK(drover_backend_call(D, "local", NULL, NULL, NULL, &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "op is NULL") != NULL);
  CHECK(drover_backend_call(D, "local", NULL, "list", NULL, NULL) == DROVER_OK); /* result dropped */
  CHECK(drover_backend_load(NULL, "local") == DROVER_EARG);
  CHECK(drover_backend_load(D, NULL) == DROVER_EARG);
  drover_free(NULL);
  drover_close(D);
}

/* DIR/NAME.lua: a backend extending BaseOrchestrator with METHODS (Lua). */
static const char *backend_file(char *path, size_t size, const char *dir, const char *name, const char *methods) {
  char text[2048];
  snprintf(path, size, "%s/%s.lua", dir, name);
  snprintf(text, sizeof text,
           "local B = require('drover').BaseOrchestrator:extend('%s')\nB.backend_name = '%s'\n%sreturn B\n", name,
           name, methods);
  write_file(path, text);
  return path;
}

/* An empty list is [] in the results of list and logs, not {}; other
 * operations' empty tables stay objects. */
static void test_empty_lists(void) {
  drover *D = open_engine(NULL);
  char dir[128], path[160], *out = NULL;
  CHECK(make_dir(dir, sizeof dir) != NULL);
  CHECK(drover_backend_call(D, "local", NULL, "list", NULL, &out) == DROVER_OK); /* an empty store */
  CHECK_STR(out, "[[]]");
  drover_free(out);
  backend_file(path, sizeof path, dir, "quiet",
               "function B:logs(id) return {} end\n"
               "function B:list() return {} end\n"
               "function B:status(id) return {} end\n");
  CHECK(drover_backend_call(D, path, NULL, "logs", "[\"r1\"]", &out) == DROVER_OK);
  CHECK_STR(out, "[[]]");
  drover_free(out);
  CHECK(drover_backend_call(D, path, NULL, "list", NULL, &out) == DROVER_OK);
  CHECK_STR(out, "[[]]");
  drover_free(out);
  CHECK(drover_backend_call(D, path, NULL, "status", "[\"r1\"]", &out) == DROVER_OK);
  CHECK_STR(out, "[{}]");
  drover_free(out);
  drover_close(D);
}

/* cancel is one of the operations drover_backend_call reaches */
static void test_cancel_operation(void) {
  drover *D = open_engine(NULL);
  char dir[128], path[160], *out = NULL;
  CHECK(make_dir(dir, sizeof dir) != NULL);
  backend_file(path, sizeof path, dir, "cancels",
               "function B:cancel(id) return { id = id, state = 'CANCELLING' } end\n");
  CHECK(drover_backend_call(D, path, NULL, "cancel", "[\"r1\"]", &out) == DROVER_OK);
  CHECK(out != NULL && strstr(out, "\"state\":\"CANCELLING\"") != NULL && strstr(out, "\"id\":\"r1\"") != NULL);
  drover_free(out);
  CHECK(drover_backend_call(D, path, NULL, "explode", NULL, &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "stop, cancel, status") != NULL); /* the list names it */
  drover_close(D);
}

/* ---- each blocking call waits for its own work only ------------------------- */

static void test_own_work_only(void) {
  drover *D = open_engine(NULL);
  lua_State *L = drover_lua(D);
  char dir[128], path[160], *out = NULL;
  int ticks_before;
  alarm(60); /* a call that waits for the watcher never returns: fail in a minute */
  CHECK(make_dir(dir, sizeof dir) != NULL);
  /* a watcher that never ends, as a host's drover_start would leave running */
  CHECK(drover_start(D, "local d = require 'drover'\n"
                        "while true do TICKS = (TICKS or 0) + 1; d.sleep(0.005) end\n",
                     "=watcher") == DROVER_OK);
  CHECK(drover_dostring(D, "require('drover').sleep(0.02)", "=own") == DROVER_OK);
  /* ... and the watcher ran meanwhile: the calls share the loop */
  lua_getglobal(L, "TICKS");
  ticks_before = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  CHECK(ticks_before > 0);
  CHECK(drover_backend_call(D, "local", NULL, "list", NULL, &out) == DROVER_OK);
  drover_free(out);
  snprintf(path, sizeof path, "%s/wf.lua", dir);
  write_file(path, "return 1\n");
  CHECK(drover_exec(D, path, NULL, &out) == DROVER_OK);
  drover_free(out);
  /* a task the code spawned and did not join is its own work: waited for */
  CHECK(drover_dostring(D, "local d = require 'drover'\n"
                           "d.spawn(function() d.sleep(0.03); d.spawn(function() d.sleep(0.01); CHILD = 'done' end) end)\n",
                        "=spawner") == DROVER_OK);
  lua_getglobal(L, "CHILD");
  CHECK_STR(lua_tostring(L, -1), "done");
  lua_pop(L, 1);
  CHECK(drover_step(D) >= 1); /* the watcher is still alive */
  drover_close(D);
}

/* ---- workflow files ---------------------------------------------------------- */

static int host_record(lua_State *L) {
  char *buf = (char *)drover_host_ud(L);
  snprintf(buf, 64, "%s", luaL_checkstring(L, 1));
  return 0;
}

static void test_exec(void) {
  drover *D = open_engine(NULL);
  char dir[128], path[160], recorded[64] = "", *out = NULL;
  CHECK(make_dir(dir, sizeof dir) != NULL);
  CHECK(drover_register(D, "record", host_record, recorded) == DROVER_OK);
  snprintf(path, sizeof path, "%s/wf.lua", dir);
  write_file(path, "local d = require 'drover'\n"
                   "local params = ...\n"
                   "local double = d.task('double', function(x) d.sleep(0.01); return 2 * x end)\n"
                   "d.host.record('got ' .. double(params.n))\n");
  CHECK(drover_exec(D, path, "{\"n\": 21}", &out) == DROVER_OK);
  CHECK_STR(recorded, "got 42");
  CHECK(out != NULL && strstr(out, "\"state\":\"COMPLETED\"") != NULL && strstr(out, "\"name\":\"wf\"") != NULL);
  CHECK(strstr(out, "\"message\":null") != NULL); /* always the same keys */
  CHECK(strstr(out, "\"result\":null") != NULL);  /* the chunk returned nothing */
  drover_free(out);
  /* the run and its task run are in the store */
  CHECK(drover_dostring(D,
                        "local t = require 'drover.tracker'\n"
                        "local s = t.default_store()\n"
                        "local runs = s:flow_runs { limit = 10 }\n"
                        "assert(#runs == 1 and runs[1].state == 'COMPLETED', 'one completed flow run')\n"
                        "local tr = s:task_runs(runs[1].id)\n"
                        "assert(#tr == 1 and tr[1].name == 'double', 'its task run')",
                        "=check") == DROVER_OK);
  /* what the flow returned */
  write_file(path, "local params = ...\nreturn { answer = params.n * 2, none = {} }\n");
  CHECK(drover_exec(D, path, "{\"n\": 21}", &out) == DROVER_OK);
  CHECK(out != NULL && strstr(out, "\"result\":{\"answer\":42,\"none\":{}}") != NULL);
  drover_free(out);
  /* a failing workflow: DROVER_ERUN, the state in out, the error in the message */
  write_file(path, "error('workflow broke')\n");
  CHECK(drover_exec(D, path, NULL, &out) == DROVER_ERUN);
  CHECK(out != NULL && strstr(out, "\"state\":\"FAILED\"") != NULL);
  CHECK(strstr(drover_errmsg(D), "workflow broke") != NULL);
  CHECK(strstr(drover_errmsg(D), "FAILED") != NULL);
  drover_free(out);
  /* a syntax error: file:line */
  write_file(path, "local x =\n\n+\n");
  CHECK(drover_exec(D, path, NULL, &out) == DROVER_ELOAD);
  CHECK(out == NULL);
  CHECK(strstr(drover_errmsg(D), "wf.lua:3:") != NULL);
  /* bad params, NULLs, a missing file */
  CHECK(drover_exec(D, path, "{nope", &out) == DROVER_EARG);
  CHECK(strstr(drover_errmsg(D), "params_json is not valid JSON") != NULL);
  CHECK(drover_exec(D, NULL, NULL, &out) == DROVER_EARG);
  CHECK(drover_exec(NULL, path, NULL, &out) == DROVER_EARG);
  CHECK(drover_exec(D, "/nonexistent/wf.lua", NULL, NULL) == DROVER_ELOAD);
  CHECK(strstr(drover_errmsg(D), "/nonexistent/wf.lua") != NULL);
  drover_close(D);
}

/* ---- log callback -------------------------------------------------------- */

static char logged[4096];
static void on_log(void *ud, const char *level, const char *message) {
  size_t n = strlen(logged);
  (*(int *)ud)++;
  snprintf(logged + n, sizeof logged - n, "[%s] %s\n", level, message);
}

static void test_log_callback(void) {
  drover_options o;
  drover *D;
  int count = 0;
  memset(&o, 0, sizeof o);
  o.log = on_log;
  o.log_ud = &count;
  D = open_engine(&o);
  CHECK(drover_dostring(D,
                        "local d = require 'drover'\n"
                        "d.log('hello', 42)\n"
                        "local t = d.spawn(function() error('lost task') end)\n"
                        "d.sleep(0.01)\n",
                        "=t") == DROVER_OK);
  /* the unjoined task's error is reported when its handle is collected */
  CHECK(drover_dostring(D, "collectgarbage(); collectgarbage()", "=gc") == DROVER_OK);
  CHECK(strstr(logged, "[info] hello 42\n") != NULL);
  CHECK(strstr(logged, "[error] drover: task") != NULL);
  CHECK(strstr(logged, "lost task") != NULL);
  CHECK(count >= 2);
  drover_close(D);
}

/* ---- a loop the host owns -------------------------------------------------- */

static void test_start_step(void) {
  uv_loop_t loop;
  drover_options o;
  drover *D;
  lua_State *L;
  int n, steps = 0, count = 0;
  double deadline;
  memset(&o, 0, sizeof o);
  logged[0] = '\0';
  uv_loop_init(&loop);
  o.loop = &loop;
  o.log = on_log;
  o.log_ud = &count;
  D = open_engine(&o);
  L = drover_lua(D);
  CHECK(drover_start(D, "local d = require 'drover'\n"
                        "for i = 1, 3 do d.spawn(function() d.sleep(0.02 * i); DONE = (DONE or 0) + 1 end) end\n",
                     "=started") == DROVER_OK);
  CHECK(drover_start(D, "error('started and failed')", "=bad") == DROVER_OK);
  /* drover_start returned at once: nothing has run yet */
  lua_getglobal(L, "DONE");
  CHECK(lua_isnil(L, -1));
  lua_pop(L, 1);
  deadline = now() + 30;
  do {
    n = drover_step(D);
    steps++;
    if (n > 0) usleep(1000); /* the host's own work would go here */
  } while (n > 0 && now() < deadline);
  CHECK(n == 0);
  CHECK(steps > 1); /* it did not block until the sleeps were over */
  lua_getglobal(L, "DONE");
  CHECK(lua_tointeger(L, -1) == 3);
  lua_pop(L, 1);
  CHECK(strstr(logged, "[error] bad:1: started and failed") != NULL);
  CHECK(drover_start(D, "local = 1", "=syn") == DROVER_ELOAD);
  CHECK(strstr(drover_errmsg(D), "syn:1:") != NULL);
  CHECK(drover_start(D, NULL, NULL) == DROVER_EARG);
  CHECK(drover_start(NULL, "x", NULL) == DROVER_EARG);
  CHECK(drover_step(NULL) == DROVER_EARG);
  drover_close(D);
  uv_run(&loop, UV_RUN_NOWAIT);
  CHECK(uv_loop_close(&loop) == 0);
}

/* ---- closing ------------------------------------------------------------------ */

static void test_close_twice(void) {
  drover_options o;
  drover *D = open_engine(NULL), *broken;
  CHECK(D != NULL);
  drover_close(D);
  drover_close(D); /* harmless: it is no longer open */
  drover_close(NULL);
  /* an engine drover_open could not set up, and one with work left */
  memset(&o, 0, sizeof o);
  o.lua_dir = "/nonexistent";
  broken = drover_open(&o);
  CHECK(broken != NULL && *drover_errmsg(broken));
  drover_close(broken);
  drover_close(broken);
  D = open_engine(NULL);
  CHECK(drover_start(D, "require('drover').sleep(60)", "=left") == DROVER_OK);
  CHECK(drover_step(D) == 1);
  drover_close(D);
  drover_close(D);
}

int main(void) {
  static const tap_test tests[] = {
      {"host functions registered in C are called from tasks", test_register},
      {"local backend: package, deploy, run, status, logs, list through JSON", test_local_backend},
      {"backend calls: bad JSON, syntax errors with file:line, unimplemented ops, NULLs", test_backend_bad_input},
      {"drover_exec runs a workflow file as a tracked flow run", test_exec},
      {"list and logs give [] for an empty list, not {}", test_empty_lists},
      {"drover_backend_call reaches cancel", test_cancel_operation},
      {"a blocking call waits for its own tasks, not for a watcher drover_start began", test_own_work_only},
      {"drover_close twice, or on NULL, is harmless", test_close_twice},
      {"the log callback gets drover.log lines and task errors", test_log_callback},
      {"drover_start + drover_step drive a host-owned loop without blocking", test_start_step},
      {NULL, NULL}};
  int rc;
  char rm[128];
  snprintf(tmp_root, sizeof tmp_root, "/tmp/drover-api-XXXXXX");
  if (mkdtemp(tmp_root) == NULL) return 1;
  rc = tap_run(tests, 150);
  snprintf(rm, sizeof rm, "rm -rf '%s'", tmp_root);
  if (system(rm) != 0) fprintf(stderr, "could not remove %s\n", tmp_root);
  return rc;
}
