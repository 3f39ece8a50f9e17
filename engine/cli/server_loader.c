/*
 * server_loader.c -- the drover binary's drover.core.server, loaded on use.
 *
 * The HTTP server links H2O, and H2O brings TLS and compression libraries
 * whose relocation alone tripled the cold start of every drover process,
 * including the many that never serve HTTP (workers, `drover exec`).  So
 * the binary does not link server.c: it carries this stub, which fills
 * drover.core.server from the plugin build/plugins/server.so (or
 * PREFIX/lib/drover/server.so once installed) the first time a field of it
 * is read.  The plugin resolves the engine's drv__ symbols from the binary,
 * which exports them (-Wl,-E).  libdrover and core.so link server.c
 * directly and do not use this file.
 */
#include "drover_int.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *drv__server_plugin;

static const char *drv__plugin_path(char *buf, size_t len) {
  const char *env = getenv("DROVER_PLUGIN_DIR");
  char exe[PATH_MAX];
  size_t n = sizeof exe;
  char *slash;
  if (env && *env) {
    snprintf(buf, len, "%s/server.so", env);
    return buf;
  }
  if (uv_exepath(exe, &n) != 0) return NULL;
  slash = strrchr(exe, '/');
  if (slash) *slash = '\0';
  snprintf(buf, len, "%s/plugins/server.so", exe); /* build tree: build/plugins */
  if (access(buf, R_OK) == 0) return buf;
  snprintf(buf, len, "%s/../lib/drover/server.so", exe); /* installed */
  return buf;
}

/* __index(server_table, key): load the plugin, let it fill the table. */
static int drv__server_load(lua_State *L) {
  int (*open)(lua_State *);
  if (drv__server_plugin == NULL) {
    char path[PATH_MAX + 64];
    if (drv__plugin_path(path, sizeof path) == NULL)
      return luaL_error(L, "drover.server: cannot find the server plugin");
    drv__server_plugin = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (drv__server_plugin == NULL)
      return luaL_error(L, "drover.server: cannot load %s: %s", path, dlerror());
  }
  *(void **)&open = dlsym(drv__server_plugin, "drv__server_plugin_open");
  if (open == NULL) return luaL_error(L, "drover.server: the plugin has no entry point");
  /* The plugin's open expects drover.core just below the table it fills. */
  lua_settop(L, 2);
  lua_pushvalue(L, lua_upvalueindex(1)); /* 3: drover.core */
  lua_pushvalue(L, 1);                   /* 4: the server table */
  lua_pushnil(L);
  lua_setmetatable(L, 4);
  open(L);
  lua_settop(L, 2);
  lua_rawget(L, 1); /* the key, now that the table is filled */
  return 1;
}

int drv__open_server(lua_State *L) {
  /* stack: ... drover.core, server table */
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, -3);
  lua_pushcclosure(L, drv__server_load, 1);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  return 0;
}
