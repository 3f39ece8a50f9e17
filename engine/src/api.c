/*
 * api.c -- the public C API (drover.h) over the engine.
 *
 * drover_open builds a Lua state the way the drover binary needs it: the
 * standard libraries, cjson and drover.core preloaded, package.path pointed
 * at the Lua library, and a "drover.config" table the Lua side reads for
 * its directories.
 */
#include "drover_int.h"
#include "drover.h"

#include <lua-cjson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef DRV_PREFIX
#define DRV_PREFIX "/usr/local"
#endif

int luaopen_drover_core(lua_State *L);

struct drover {
  lua_State *L;
  char errmsg[1024];
  char lua_dir[PATH_MAX + 64];
  char backends_dir[PATH_MAX + 128];
};

static void drv__seterr(drover *D, const char *msg) {
  snprintf(D->errmsg, sizeof D->errmsg, "%s", msg ? msg : "unknown error");
}

static int drv__isfile(const char *path) { return access(path, R_OK) == 0; }

/* Find lua/ and backends/: next to the binary (a build tree: build/../lua),
 * under the binary's prefix (bin/../share/drover), or the compiled-in prefix. */
static void drv__find_dirs(drover *D, const drover_options *o) {
  char exe[PATH_MAX], probe[PATH_MAX + 128];
  size_t n = sizeof exe;
  const char *env = getenv("DROVER_LUA_DIR");
  const char *cands[3];
  int i;
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
  if (uv_exepath(exe, &n) == 0) {
    char *slash = strrchr(exe, '/');
    if (slash) *slash = '\0';
    cands[0] = "%s/../lua";
    cands[1] = "%s/../share/drover/lua";
    for (i = 0; i < 2; i++) {
      char dir[PATH_MAX + 32];
      snprintf(dir, sizeof dir, cands[i], exe);
      snprintf(probe, sizeof probe, "%s/drover/init.lua", dir);
      if (drv__isfile(probe)) {
        char real[PATH_MAX + 64];
        if (realpath(dir, real) == NULL) snprintf(real, sizeof real, "%s", dir);
        snprintf(D->lua_dir, sizeof D->lua_dir, "%s", real);
        snprintf(D->backends_dir, sizeof D->backends_dir, "%s/../backends", real);
        if (realpath(D->backends_dir, real)) snprintf(D->backends_dir, sizeof D->backends_dir, "%s", real);
        return;
      }
    }
  }
  snprintf(D->lua_dir, sizeof D->lua_dir, "%s/share/drover/lua", DRV_PREFIX);
  snprintf(D->backends_dir, sizeof D->backends_dir, "%s/share/drover/backends", DRV_PREFIX);
}

static void drv__setfield_str(lua_State *L, const char *k, const char *v) {
  if (v == NULL) return;
  lua_pushstring(L, v);
  lua_setfield(L, -2, k);
}

static int drv__setup(lua_State *L) {
  drover *D = (drover *)lua_touserdata(L, 1);
  const drover_options *o = (const drover_options *)lua_touserdata(L, 2);
  luaL_openlibs(L);
  drv__engine_attach(L, o ? o->loop : NULL);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_cjson);
  lua_setfield(L, -2, "cjson");
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
  if (o && o->exit_on_signal) drv__exit_on_signals(drv__engine(L));
  return 0;
}

drover *drover_open(const drover_options *opts) {
  drover *D = (drover *)calloc(1, sizeof *D);
  if (D == NULL) return NULL;
  D->L = luaL_newstate();
  if (D->L == NULL) { free(D); return NULL; }
  drv__find_dirs(D, opts);
  lua_pushcfunction(D->L, drv__setup);
  lua_pushlightuserdata(D->L, D);
  lua_pushlightuserdata(D->L, (void *)opts);
  if (lua_pcall(D->L, 2, 0, 0) != LUA_OK) {
    drv__seterr(D, lua_tostring(D->L, -1));
    lua_pop(D->L, 1);
  }
  return D;
}

void drover_close(drover *D) {
  if (D == NULL) return;
  lua_close(D->L);
  free(D);
}

const char *drover_errmsg(const drover *D) {
  if (D == NULL) return "drover: engine is NULL";
  return D->errmsg;
}

lua_State *drover_lua(drover *D) { return D ? D->L : NULL; }

uv_loop_t *drover_loop(drover *D) {
  if (D == NULL) return NULL;
  return drv__engine(D->L)->loop;
}

/* Call drover.run(chunk, ...) with the chunk and n args on the stack. */
static int drv__run_chunk(drover *D, int nargs) {
  lua_State *L = D->L;
  int base = lua_gettop(L) - nargs; /* index of the chunk */
  lua_pushcfunction(L, drv__run);
  lua_insert(L, base);
  if (lua_pcall(L, nargs + 1, 0, 0) != LUA_OK) {
    const char *m = lua_tostring(L, -1);
    drv__seterr(D, m ? m : "(error object is not a string)");
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
  if (luaL_loadbuffer(D->L, code, strlen(code), chunkname ? chunkname : "=(string)") != LUA_OK) {
    drv__seterr(D, lua_tostring(D->L, -1));
    lua_pop(D->L, 1);
    return DROVER_ELOAD;
  }
  return drv__run_chunk(D, 0);
}
