/*
 * main.c -- the drover command-line program.
 *
 *   drover FILE.lua [args]   run a Lua script inside the scheduler, like lua5.4 FILE.lua
 *                            (any path with a '/' too: ./script)
 *   drover -e CODE           run a string
 *   drover COMMAND [...]     a subcommand, implemented in Lua by drover.cli
 *
 * Everything beyond running a script lives in Lua (lua/drover/cli.lua), so
 * this file stays a thin shell over the public API in drover.h.
 */
#include "drover.h"

#include <lauxlib.h>
#include <stdio.h>
#include <string.h>

static void usage(FILE *f) {
  fputs("usage: drover FILE.lua [args...]   run a Lua script with the drover runtime\n"
        "       drover -e CODE [args...]    run a string of Lua code\n"
        "       drover COMMAND [options]    run a command (drover help lists them)\n"
        "       drover --version\n",
        f);
}

/* A script is named by a path that looks like one: with a '/' (./status)
 * or ending in .lua.  Any other word is a command, even when a file of
 * that name is in the current directory: `drover status` must not run a
 * file called status (drover.cli says how to run it, if it is there). */
static int is_script(const char *a) {
  size_t n = strlen(a);
  return strchr(a, '/') != NULL || (n > 4 && strcmp(a + n - 4, ".lua") == 0);
}

/* Run drover.cli.main(args) and return its exit code. */
static int run_command(drover *D, int argc, char **argv) {
  lua_State *L = drover_lua(D);
  int i, rc;
  lua_createtable(L, argc, 0);
  for (i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_setglobal(L, "arg");
  rc = drover_dostring(D,
                       "local code = require('drover.cli').main(arg)\n"
                       "_G.arg = code\n",
                       "=drover");
  if (rc != DROVER_OK) {
    fprintf(stderr, "drover: %s\n", drover_errmsg(D));
    return 2;
  }
  lua_getglobal(L, "arg");
  rc = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
  lua_pop(L, 1);
  return rc;
}

int main(int argc, char **argv) {
  drover *D;
  int rc = 0;
  if (argc >= 2 && (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-v") == 0)) {
    printf("drover %s (%s, libuv %s)\n", DROVER_VERSION, LUA_RELEASE, uv_version_string());
    return 0;
  }
  if (argc >= 2 && (strcmp(argv[1], "-h") == 0)) {
    usage(stdout);
    return 0;
  }
  {
    /* Ctrl-C, SIGTERM or SIGHUP during a plain script ends every child
     * process group the engine started (children live in their own
     * sessions and would outlive it), then exits 128+signal.  Commands
     * such as `drover exec` install their own two-phase cancel instead. */
    drover_options o;
    memset(&o, 0, sizeof o);
    o.exit_on_signal = argc >= 2 && (strcmp(argv[1], "-e") == 0 || is_script(argv[1]));
    D = drover_open(&o);
  }
  if (D == NULL) {
    fputs("drover: out of memory\n", stderr);
    return 2;
  }
  if (*drover_errmsg(D)) {
    fprintf(stderr, "drover: %s\n", drover_errmsg(D));
    drover_close(D);
    return 2;
  }
  if (argc < 2) {
    usage(stderr);
    rc = 2;
  } else if (strcmp(argv[1], "-e") == 0) {
    if (argc < 3) {
      fputs("drover: -e needs an argument\n", stderr);
      rc = 2;
    } else {
      lua_State *L = drover_lua(D);
      int i;
      lua_createtable(L, argc, 0);
      for (i = 3; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - 2);
      }
      lua_setglobal(L, "arg");
      if (luaL_loadbuffer(L, argv[2], strlen(argv[2]), "=(command line)") != LUA_OK) {
        fprintf(stderr, "drover: %s\n", lua_tostring(L, -1));
        lua_pop(L, 1);
        rc = 1;
      } else {
        for (i = 3; i < argc; i++) lua_pushstring(L, argv[i]);
        if (drover_call(D, argc - 3) != DROVER_OK) {
          fprintf(stderr, "drover: %s\n", drover_errmsg(D));
          rc = 1;
        }
      }
    }
  } else if (is_script(argv[1])) {
    if (drover_dofile(D, argv[1], argc - 1,
                      (const char *const *)argv + 1) != DROVER_OK) {
      fprintf(stderr, "drover: %s\n", drover_errmsg(D));
      rc = 1;
    }
  } else {
    rc = run_command(D, argc, argv);
  }
  fflush(stdout);
  drover_close(D);
  return rc;
}
