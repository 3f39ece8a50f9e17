/*
 * driver.c -- the libFuzzer entry points shared by every harness.
 *
 * A harness is tests/fuzz/NAME.lua: a chunk that returns a function
 * one(data), called with each input the fuzzer makes.  one() raises when
 * a property fails (a decode that raised instead of returning nil,
 * message; a round trip that changed the value; a file written outside
 * the destination...); the driver then prints the message and aborts, so
 * libFuzzer saves the input as a crash.  Memory errors are ASan's and
 * UBSan's: the engine in this binary is built with them (see the Makefile's
 * `fuzz` target), Lua itself is the system's.
 *
 * The engine is opened once per process through the public API (drover.h),
 * as an embedder would; DRV_FUZZ_ROOT (compiled in) is the checkout, so
 * the harness loads the tree's own Lua library.  The harness chunk gets
 * one argument, a table of C helpers:
 *   confine(dir | nil)   while set, every path the engine creates or opens
 *                        for writing through *at() calls must lie inside
 *                        dir (see the wrappers below); the first one that
 *                        does not aborts
 *   readlink(path)       a symbolic link's target, or nil when path is not one
 *   budget(n | nil)      from now on, raise "over budget" once the Lua code
 *                        has run about n more VM instructions (nil: no limit)
 *   home                 a scratch directory (under /dev/shm when there is
 *                        one), removed at exit
 *
 * Coverage of Lua code: libFuzzer sees only instrumented C, and the cron
 * parser and the daemon's routing are Lua run by the system's (plain)
 * interpreter.  A line hook feeds the pairs (previous line, line) into an
 * extra-counters section, which libFuzzer treats as coverage like its own,
 * so new paths through Lua code count as progress.
 */
#include <drover.h>
#include <lauxlib.h>
#include <lua.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef DRV_FUZZ_TARGET
#error "build with -DDRV_FUZZ_TARGET=\"name\" (tests/fuzz/NAME.lua)"
#endif

static drover *fz_engine;
static int fz_one = LUA_NOREF;
static char fz_confine[PATH_MAX]; /* "" when not confining */

/* ---- Lua coverage and budgets --------------------------------------------- */

#define FZ_COV_SIZE (1 << 16)
#define FZ_COUNT_STEP 1000
__attribute__((used, section("__libfuzzer_extra_counters"))) static uint8_t fz_lua_cov[FZ_COV_SIZE];
static uintptr_t fz_prev_line;
static long long fz_budget_left = -1; /* < 0: no budget */

static void fz_hook(lua_State *L, lua_Debug *ar) {
  if (ar->event == LUA_HOOKCOUNT) {
    if (fz_budget_left >= 0 && (fz_budget_left -= FZ_COUNT_STEP) < 0) {
      fz_budget_left = -1;
      luaL_error(L, "over budget");
    }
    return;
  }
  if (!lua_getinfo(L, "S", ar)) return;
  /* the source string of a chunk stays put while it is loaded */
  uintptr_t here = ((uintptr_t)ar->source >> 4) * 2654435761u + (uintptr_t)ar->currentline;
  uint8_t *c = &fz_lua_cov[(here ^ (fz_prev_line >> 1)) & (FZ_COV_SIZE - 1)];
  if (*c < 255) (*c)++;
  fz_prev_line = here;
}

static int fz_l_budget(lua_State *L) {
  fz_budget_left = lua_isnoneornil(L, 1) ? -1 : (long long)luaL_checkinteger(L, 1);
  return 0;
}

/* ---- confinement: the linker sends the engine's *at() calls here -------- */

/* Built with -Wl,--wrap=openat,... so that calls in libdrover.a reach the
 * __wrap_ function and __real_ is the C library's.  The check resolves
 * the directory descriptor through /proc/self/fd and joins the name; a
 * name with a '/' or a ".." is judged on the joined text, which is what
 * openat would walk (tar.c opens parents one component at a time, so an
 * honest call never has either). */
int __real_openat(int dirfd, const char *name, int flags, ...);
int __real_mkdirat(int dirfd, const char *name, mode_t mode);
int __real_symlinkat(const char *target, int dirfd, const char *name);
int __real_linkat(int olddirfd, const char *oldname, int newdirfd, const char *newname, int flags);
int __real_unlinkat(int dirfd, const char *name, int flags);

static void fz_check(const char *call, int dirfd, const char *name) {
  char dir[PATH_MAX], link[64];
  size_t n = strlen(fz_confine);
  if (!fz_confine[0]) return;
  if (name[0] == '/') {
    snprintf(dir, sizeof dir, "%s", name);
  } else {
    ssize_t k;
    if (dirfd == AT_FDCWD) {
      if (!getcwd(dir, sizeof dir)) dir[0] = '\0';
      k = (ssize_t)strlen(dir);
    } else {
      snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
      k = readlink(link, dir, sizeof dir - 1);
      if (k < 0) k = 0;
    }
    dir[k] = '\0';
    if (strcmp(name, ".") != 0) snprintf(dir + k, sizeof dir - (size_t)k, "/%s", name);
  }
  int inside = strncmp(dir, fz_confine, n) == 0 && (dir[n] == '\0' || dir[n] == '/') &&
               strstr(dir + n, "/../") == NULL &&
               !(strlen(dir) >= 3 && strcmp(dir + strlen(dir) - 3, "/..") == 0);
  if (!inside) {
    fprintf(stderr, "fuzz: %s(%d, \"%s\") reaches %s, outside %s\n", call, dirfd, name, dir,
            fz_confine);
    abort();
  }
}

int __wrap_openat(int dirfd, const char *name, int flags, ...) {
  mode_t mode = 0;
  if (flags & (O_CREAT | O_TMPFILE)) {
    va_list ap;
    va_start(ap, flags);
    mode = (mode_t)va_arg(ap, int);
    va_end(ap);
  }
  fz_check("openat", dirfd, name);
  return __real_openat(dirfd, name, flags, mode);
}

int __wrap_mkdirat(int dirfd, const char *name, mode_t mode) {
  fz_check("mkdirat", dirfd, name);
  return __real_mkdirat(dirfd, name, mode);
}

int __wrap_symlinkat(const char *target, int dirfd, const char *name) {
  fz_check("symlinkat", dirfd, name);
  return __real_symlinkat(target, dirfd, name);
}

int __wrap_linkat(int olddirfd, const char *oldname, int newdirfd, const char *newname,
                  int flags) {
  fz_check("linkat (source)", olddirfd, oldname);
  fz_check("linkat", newdirfd, newname);
  return __real_linkat(olddirfd, oldname, newdirfd, newname, flags);
}

int __wrap_unlinkat(int dirfd, const char *name, int flags) {
  fz_check("unlinkat", dirfd, name);
  return __real_unlinkat(dirfd, name, flags);
}

/* confine(dir | nil): dir must exist; its real path is what is compared. */
static int fz_l_confine(lua_State *L) {
  if (lua_isnoneornil(L, 1)) {
    fz_confine[0] = '\0';
    return 0;
  }
  const char *dir = luaL_checkstring(L, 1);
  if (!realpath(dir, fz_confine)) return luaL_error(L, "confine: %s: %s", dir, strerror(errno));
  return 0;
}

static int fz_l_readlink(lua_State *L) {
  char buf[PATH_MAX];
  ssize_t n = readlink(luaL_checkstring(L, 1), buf, sizeof buf);
  if (n < 0) return 0;
  lua_pushlstring(L, buf, (size_t)n);
  return 1;
}

/* ---- libFuzzer ----------------------------------------------------------- */

static void fz_fail(const char *what, const char *msg) {
  fprintf(stderr, "fuzz %s: %s: %s\n", DRV_FUZZ_TARGET, what, msg ? msg : "(no message)");
  abort();
}

/* In memory when the system has /dev/shm: the untar harness creates and
 * removes files for every input, which costs milliseconds on a disk. */
static char fz_home[64];

static int fz_rm(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  remove(path);
  return 0;
}

/* libFuzzer ends with exit() after -max_total_time or -runs: the store and
 * the harness's scratch files go with the process (a crash leaves them for
 * whoever looks into it). */
static void fz_cleanup(void) {
  if (fz_engine) drover_close(fz_engine);
  fz_engine = NULL;
  nftw(fz_home, fz_rm, 16, FTW_DEPTH | FTW_PHYS);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  char *home = fz_home;
  drover_options o = {0};
  (void)argc;
  (void)argv;
  snprintf(fz_home, sizeof fz_home, "%s/drover-fuzz-home.XXXXXX",
           access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  if (!mkdtemp(home)) fz_fail("init", strerror(errno));
  atexit(fz_cleanup);
  o.home = home;
  o.lua_dir = DRV_FUZZ_ROOT "/lua";
  fz_engine = drover_open(&o);
  if (!fz_engine) fz_fail("init", "drover_open failed");
  lua_State *L = drover_lua(fz_engine);
  lua_sethook(L, fz_hook, LUA_MASKLINE | LUA_MASKCOUNT, FZ_COUNT_STEP);
  if (luaL_loadfile(L, DRV_FUZZ_ROOT "/tests/fuzz/" DRV_FUZZ_TARGET ".lua") != LUA_OK)
    fz_fail("load", lua_tostring(L, -1));
  static const luaL_Reg helpers[] = {
      {"confine", fz_l_confine}, {"readlink", fz_l_readlink}, {"budget", fz_l_budget}, {NULL, NULL}};
  luaL_newlib(L, helpers);
  lua_pushstring(L, home);
  lua_setfield(L, -2, "home");
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) fz_fail("setup", lua_tostring(L, -1));
  if (lua_type(L, -1) != LUA_TFUNCTION) fz_fail("setup", "the harness must return a function");
  fz_one = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = drover_lua(fz_engine);
  int top = lua_gettop(L);
  fz_prev_line = 0;
  fz_budget_left = -1;
  lua_rawgeti(L, LUA_REGISTRYINDEX, fz_one);
  lua_pushlstring(L, (const char *)data, size);
  int rc = lua_pcall(L, 1, 0, 0);
  fz_budget_left = -1;
  if (rc != LUA_OK) {
    fz_confine[0] = '\0';
    fz_fail("property failed", lua_tostring(L, -1));
  }
  lua_settop(L, top);
  return 0;
}
