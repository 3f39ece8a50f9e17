/*
 * searcher.c -- require() reads a module's compiled chunk when one is
 * there, fresh, beside its source.
 *
 * Every `drover` command starts a new Lua state and requires the modules
 * it needs (the CLI, the tracker, the store...): about 250 KB of Lua,
 * whose parsing was a third of what `drover ls` or `drover exec` cost
 * before it did anything (5.5 ms of 15 on this project's machines).  A
 * compiled chunk (string.dump of the loaded source, kept with its debug
 * information, so tracebacks and error messages are the same) loads ten
 * times faster.  `make` writes them beside the sources: lua/drover/x.lua
 * gets lua/drover/x.luac (tools/compile_lua.lua; `make install` compiles
 * the installed copies in place).
 *
 * The source stays the truth.  This searcher runs before Lua's own and
 * finds the module's source exactly as that one would (package.path);
 * it takes FILE.luac instead only when
 *   - it is not older than FILE.lua (an edited source is read, not a
 *     chunk compiled before the edit),
 *   - it loads as a binary chunk of this very Lua (lua_load checks the
 *     version and the sizes of its types: another Lua's is refused), and
 *   - it was compiled from FILE.lua at this path (its chunk name says so:
 *     a tree copied elsewhere names its old path, and is read from source
 *     so that tracebacks name the files that are there).
 * Anything else: nothing is said, and Lua's searcher reads the source.
 */
#include "drover_int.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Chunks bigger than this are left to Lua's searcher (none is near it). */
#define DRV_CHUNK_MAX (64 << 20)

/* a older than b (modification times, to the nanosecond)? */
static int drv__older(const struct stat *a, const struct stat *b) {
  if (a->st_mtim.tv_sec != b->st_mtim.tv_sec) return a->st_mtim.tv_sec < b->st_mtim.tv_sec;
  return a->st_mtim.tv_nsec < b->st_mtim.tv_nsec;
}

/* Load the chunk file `path` (not older than the source `ss`) as a binary
 * chunk: one open, fstat and read, where luaL_loadfilex reads a byte,
 * reopens the file in binary mode and reads it 4 KB at a time.  Pushes the
 * function and returns LUA_OK, or pushes nothing and returns another code. */
static int drv__load_chunk(lua_State *L, const char *path, const struct stat *ss) {
  struct stat cs;
  char *buf;
  size_t got = 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC), rc = LUA_ERRFILE;
  if (fd < 0) return LUA_ERRFILE;
  if (fstat(fd, &cs) != 0 || !S_ISREG(cs.st_mode) || drv__older(&cs, ss) || cs.st_size <= 0 ||
      cs.st_size > DRV_CHUNK_MAX || (buf = (char *)malloc((size_t)cs.st_size)) == NULL) {
    close(fd);
    return LUA_ERRFILE;
  }
  while (got < (size_t)cs.st_size) {
    ssize_t n = read(fd, buf + got, (size_t)cs.st_size - got);
    if (n <= 0) break; /* an error, or the file shrank: not this chunk */
    got += (size_t)n;
  }
  close(fd);
  if (got == (size_t)cs.st_size) {
    lua_pushfstring(L, "@%s", path);
    rc = luaL_loadbufferx(L, buf, got, lua_tostring(L, -1), "b");
    if (rc == LUA_OK) lua_remove(L, -2); /* the name */
    else lua_pop(L, 2);                  /* the name, the message */
  }
  free(buf);
  return rc;
}

/* package.searchers entry: (name) -> loader, source path; or nothing. */
static int drv__search_compiled(lua_State *L) {
  const char *src, *chunk;
  struct stat ss;
  lua_Debug ar;
  luaL_checkstring(L, 1);
  lua_settop(L, 1);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);      /* 2 */
  if (lua_getfield(L, 2, LUA_LOADLIBNAME) != LUA_TTABLE) return 0; /* 3: package */
  if (lua_getfield(L, 3, "searchpath") != LUA_TFUNCTION) return 0; /* 4 */
  lua_pushvalue(L, 1);
  if (lua_getfield(L, 3, "path") != LUA_TSTRING) return 0;
  lua_call(L, 2, 1);                                               /* 4: the source's path */
  if ((src = lua_tostring(L, 4)) == NULL) return 0; /* not on the path: Lua's searcher says so */
  chunk = lua_pushfstring(L, "%sc", src);                          /* 5 */
  if (stat(src, &ss) != 0 || drv__load_chunk(L, chunk, &ss) != LUA_OK) return 0; /* 6: the chunk */
  lua_pushvalue(L, 6);
  if (!lua_getinfo(L, ">S", &ar) || ar.source[0] != '@' || strcmp(ar.source + 1, src) != 0) return 0;
  lua_pushvalue(L, 4); /* the loader's second argument, as Lua's searcher gives it */
  return 2;
}

/* Put the searcher before Lua's own (which is package.searchers[2], after
 * the preload searcher). */
void drv__searcher_install(lua_State *L) {
  lua_Integer i, n;
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, LUA_LOADLIBNAME) != LUA_TTABLE ||
      lua_getfield(L, -1, "searchers") != LUA_TTABLE) {
    lua_settop(L, lua_gettop(L) - 3);
    return;
  }
  n = (lua_Integer)lua_rawlen(L, -1);
  for (i = n; i >= 2; i--) {
    lua_rawgeti(L, -1, i);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushcfunction(L, drv__search_compiled);
  lua_rawseti(L, -2, 2);
  lua_pop(L, 3);
}
