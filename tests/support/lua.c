/*
 * lua.c -- a minimal stand-alone Lua 5.4 interpreter for the sanitizer run.
 *
 * Debian's lua5.4 is not built with ASan, and preloading libasan into it
 * leaks LD_PRELOAD into every child process the tests start (some of which,
 * such as pgrep and curl, then hang in setlocale).  Built with
 * -fsanitize=address,undefined, this interpreter carries the runtime itself,
 * so busted (--lua=build-asan/lua5.4) can load the instrumented core.so and
 * the children stay ordinary.  It does what busted needs: `lua SCRIPT
 * [args]` with `arg` set, and `lua -e CODE`.
 */
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <string.h>

static int msgh(lua_State *L) {
  const char *m = lua_tostring(L, 1);
  luaL_traceback(L, L, m ? m : "(error object is not a string)", 1);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int i, status, first = 1, nargs;
  luaL_openlibs(L);
  lua_pushcfunction(L, msgh);
  if (argc >= 3 && strcmp(argv[1], "-e") == 0) {
    status = luaL_loadstring(L, argv[2]);
    first = 2;
  } else if (argc >= 2) {
    status = luaL_loadfile(L, argv[1]);
  } else {
    fprintf(stderr, "usage: %s SCRIPT [args] | -e CODE\n", argv[0]);
    return 2;
  }
  lua_createtable(L, argc, 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - first);
  }
  lua_setglobal(L, "arg");
  if (status == LUA_OK) {
    nargs = argc - first - 1;
    for (i = first + 1; i < argc; i++) lua_pushstring(L, argv[i]);
    status = lua_pcall(L, nargs, 0, 1);
  }
  if (status != LUA_OK) {
    fprintf(stderr, "%s: %s\n", argv[0], lua_tostring(L, -1));
    lua_close(L);
    return 1;
  }
  lua_close(L);
  return 0;
}
