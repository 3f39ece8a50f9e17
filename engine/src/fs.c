/*
 * fs.c -- drover.fs: files and directories on the local filesystem.
 *
 * Synchronous on purpose (see fs_int.h): these are local operations on
 * small files, done with plain system calls on the loop thread.
 *
 * Conventions, the same for every function:
 *   - success returns a value (true when there is nothing better to return);
 *   - a filesystem failure returns nil, "drover.fs.FN: PATH: strerror", errno,
 *     like Lua's io library, so `assert(fs.read(p))` gives a good message;
 *   - a wrong argument (type, NUL byte in a path, bad mode) raises.
 *
 * Directory walks use *at() calls relative to an open directory and never
 * follow symbolic links, so remove{recursive=true} on a tree that contains a
 * link to / removes the link, not /.
 */
#include "fs_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define DRV_FSGUARD_MT "drover.fs.guard"
#define DRV_MAX_DEPTH 4096 /* directory nesting we are willing to recurse into */

/* ---- guards ---------------------------------------------------------------- */

void drv__fsguard_release(drv_fsguard *g) {
  if (g->fd >= 0) close(g->fd);
  if (g->fd2 >= 0) close(g->fd2);
  if (g->dir) closedir(g->dir);
  if (g->tmp) {
    unlink(g->tmp);
    free(g->tmp);
  }
  if (g->md && g->md_free) g->md_free(g->md);
  free(g->mem);
  g->fd = g->fd2 = -1;
  g->dir = NULL;
  g->tmp = NULL;
  g->md = NULL;
  g->mem = NULL;
}

static int drv__fsguard_gc(lua_State *L) {
  drv__fsguard_release((drv_fsguard *)luaL_checkudata(L, 1, DRV_FSGUARD_MT));
  return 0;
}

drv_fsguard *drv__fsguard(lua_State *L) {
  drv_fsguard *g = (drv_fsguard *)lua_newuserdatauv(L, sizeof *g, 0);
  memset(g, 0, sizeof *g);
  g->fd = g->fd2 = -1;
  if (luaL_newmetatable(L, DRV_FSGUARD_MT)) {
    lua_pushcfunction(L, drv__fsguard_gc);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, drv__fsguard_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  lua_toclose(L, -1);
  return g;
}

/* ---- arguments and results ------------------------------------------------ */

const char *drv__fs_checkpath(lua_State *L, int idx, const char *fname, const char *argname) {
  size_t n;
  const char *s;
  if (lua_type(L, idx) != LUA_TSTRING) drv__argerror(L, fname, argname, "string", idx);
  s = lua_tolstring(L, idx, &n);
  if (strlen(s) != n) luaL_error(L, "%s: bad argument '%s' (contains a NUL byte)", fname, argname);
  return s;
}

mode_t drv__fs_checkmode(lua_State *L, int idx, const char *fname, const char *argname,
                         mode_t dflt) {
  if (lua_isnoneornil(L, idx)) return dflt;
  if (lua_isinteger(L, idx)) {
    lua_Integer m = lua_tointeger(L, idx);
    if (m < 0 || m > 07777)
      luaL_error(L, "%s: bad argument '%s' (mode out of range 0..07777)", fname, argname);
    return (mode_t)m;
  }
  if (lua_type(L, idx) == LUA_TSTRING) {
    const char *s = lua_tostring(L, idx), *p = s;
    unsigned long m = 0;
    if (p[0] == '0' && (p[1] == 'o' || p[1] == 'O')) p += 2;
    if (*p == '\0') goto bad;
    for (; *p; p++) {
      if (*p < '0' || *p > '7') goto bad;
      m = m * 8 + (unsigned long)(*p - '0');
      if (m > 07777) goto bad;
    }
    return (mode_t)m;
  bad:
    luaL_error(L, "%s: bad argument '%s' (octal mode like \"755\" expected, got \"%s\")", fname,
               argname, s);
  }
  drv__argerror(L, fname, argname, "integer or octal string", idx);
  return dflt;
}

int drv__fs_fail(lua_State *L, const char *fname, const char *path, int err) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s: %s", fname, path, strerror(err));
  lua_pushinteger(L, err);
  return 3;
}

int drv__fs_failmsg(lua_State *L, const char *fname, const char *path, const char *why) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s: %s", fname, path, why);
  return 2;
}

/* Options table at idx: nil or a table. */
static void drv__fs_checkopts(lua_State *L, int idx, const char *fname) {
  if (!lua_isnoneornil(L, idx) && !lua_istable(L, idx))
    drv__argerror(L, fname, "opts", "table or nil", idx);
}

/* ---- low-level helpers ------------------------------------------------------ */

int drv__write_all(int fd, const void *buf, size_t n) {
  const char *p = (const char *)buf;
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

int drv__mkdir_p(const char *path, mode_t mode) {
  struct stat st;
  char *copy, *slash;
  int err = 0;
  if (mkdir(path, mode) == 0) return 0;
  if (errno == EEXIST) return stat(path, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : EEXIST;
  if (errno != ENOENT) return errno;
  /* A parent is missing: create the chain from the top.  Intermediate
   * directories get mode|0300 so that we can go on creating beneath them. */
  copy = strdup(path);
  if (copy == NULL) return ENOMEM;
  for (slash = copy + 1; (slash = strchr(slash, '/')) != NULL; slash++) {
    *slash = '\0';
    if (mkdir(copy, mode | 0300) != 0 && errno != EEXIST) {
      err = errno;
      break;
    }
    *slash = '/';
  }
  free(copy);
  if (err) return err;
  if (mkdir(path, mode) == 0) return 0;
  if (errno == EEXIST) return stat(path, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : EEXIST;
  return errno;
}

/* ---- atomic replacement ----------------------------------------------------- */

static void drv__random_name(char *out, size_t n) {
  static const char abc[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  unsigned char rnd[16];
  size_t i;
  if (n > sizeof rnd) n = sizeof rnd;
  if (getrandom(rnd, n, GRND_NONBLOCK) != (ssize_t)n) {
    uint64_t x = uv_hrtime() ^ ((uint64_t)getpid() << 32);
    for (i = 0; i < n; i++, x = x * 6364136223846793005ULL + 1442695040888963407ULL)
      rnd[i] = (unsigned char)(x >> 33);
  }
  for (i = 0; i < n; i++) out[i] = abc[rnd[i] % (sizeof abc - 1)];
}

int drv__atomic_begin(drv_fsguard *g, const char *path) {
  const char *slash = strrchr(path, '/');
  const char *base = slash ? slash + 1 : path;
  size_t dirlen = slash ? (size_t)(slash - path + 1) : 0;
  size_t baselen = strlen(base);
  int tries;
  if (*base == '\0') return *path ? EISDIR : ENOENT;
  if (baselen > 200) baselen = 200; /* keep the temporary name under NAME_MAX */
  g->tmp = (char *)malloc(dirlen + baselen + 32);
  if (g->tmp == NULL) return ENOMEM;
  for (tries = 0; tries < 100; tries++) {
    char rnd[8];
    drv__random_name(rnd, sizeof rnd);
    sprintf(g->tmp, "%.*s.%.*s.tmp-%.8s", (int)dirlen, path, (int)baselen, base, rnd);
    /* 0666: the umask applies, as for any file the program creates */
    g->fd = open(g->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (g->fd >= 0) return 0;
    if (errno != EEXIST) break;
  }
  {
    int err = errno;
    free(g->tmp);
    g->tmp = NULL;
    return err;
  }
}

static void drv__fsync_dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  char dir[PATH_MAX];
  int fd;
  if (slash == NULL) {
    strcpy(dir, ".");
  } else if (slash == path) {
    strcpy(dir, "/");
  } else {
    if ((size_t)(slash - path) >= sizeof dir) return;
    memcpy(dir, path, (size_t)(slash - path));
    dir[slash - path] = '\0';
  }
  fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  fsync(fd); /* some filesystems refuse (EINVAL): the rename happened anyway */
  close(fd);
}

int drv__atomic_commit(drv_fsguard *g, const char *path, mode_t mode, int sync) {
  struct stat st;
  int fd = g->fd;
  if (mode == (mode_t)-1 && stat(path, &st) == 0 && S_ISREG(st.st_mode)) mode = st.st_mode & 07777;
  if (mode != (mode_t)-1 && fchmod(fd, mode) != 0) return errno;
  if (sync && fsync(fd) != 0) return errno;
  g->fd = -1;
  if (close(fd) != 0) return errno;
  if (rename(g->tmp, path) != 0) return errno;
  free(g->tmp);
  g->tmp = NULL;
  if (sync) drv__fsync_dir_of(path);
  return 0;
}

/* ---- sorting ------------------------------------------------------------------ */

typedef struct {
  const char *s;
  size_t n;
} drv_str;

static int drv__strcmp(const void *a, const void *b) {
  const drv_str *x = (const drv_str *)a, *y = (const drv_str *)b;
  int c = memcmp(x->s, y->s, x->n < y->n ? x->n : y->n);
  if (c) return c;
  return x->n < y->n ? -1 : x->n > y->n;
}

void drv__sort_strings(lua_State *L, int idx) {
  lua_Integer i, n;
  drv_str *v;
  idx = lua_absindex(L, idx);
  n = (lua_Integer)lua_rawlen(L, idx);
  if (n < 2) return;
  /* The array is a userdata so an error cannot leak it; the strings stay
   * alive in a copy of the table while the original is rewritten. */
  v = (drv_str *)lua_newuserdatauv(L, (size_t)n * sizeof *v, 0);
  lua_createtable(L, (int)n, 0);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, idx, i);
    v[i - 1].s = lua_tolstring(L, -1, &v[i - 1].n);
    lua_rawseti(L, -2, i);
  }
  qsort(v, (size_t)n, sizeof *v, drv__strcmp);
  for (i = 1; i <= n; i++) {
    lua_pushlstring(L, v[i - 1].s, v[i - 1].n);
    lua_rawseti(L, idx, i);
  }
  lua_pop(L, 2);
}

/* ---- read, write, append ------------------------------------------------------- */

/* fs.read(path) -> string | nil, msg, errno */
static int drv__l_read(lua_State *L) {
  static const char *F = "drover.fs.read";
  const char *path = drv__fs_checkpath(L, 1, F, "path");
  drv_fsguard *g = drv__fsguard(L);
  struct stat st;
  size_t cap, len = 0;
  g->fd = open(path, O_RDONLY | O_CLOEXEC);
  if (g->fd < 0) return drv__fs_fail(L, F, path, errno);
  if (fstat(g->fd, &st) != 0) return drv__fs_fail(L, F, path, errno);
  if (S_ISDIR(st.st_mode)) return drv__fs_fail(L, F, path, EISDIR);
  /* st_size is a hint (0 for /proc files, stale if the file grows). */
  cap = S_ISREG(st.st_mode) && st.st_size > 0 ? (size_t)st.st_size + 1 : 8192;
  g->mem = malloc(cap);
  if (g->mem == NULL) return drv__fs_fail(L, F, path, ENOMEM);
  for (;;) {
    ssize_t r;
    if (len == cap) {
      void *m = realloc(g->mem, cap * 2);
      if (m == NULL) return drv__fs_fail(L, F, path, ENOMEM);
      g->mem = m;
      cap *= 2;
    }
    r = read(g->fd, (char *)g->mem + len, cap - len);
    if (r < 0) {
      if (errno == EINTR) continue;
      return drv__fs_fail(L, F, path, errno);
    }
    if (r == 0) break;
    len += (size_t)r;
  }
  lua_pushlstring(L, (const char *)g->mem, len);
  return 1;
}

/* fs.write(path, data [, {mode=}]) -> true: atomic replace, durable on return. */
static int drv__l_write(lua_State *L) {
  static const char *F = "drover.fs.write";
  const char *path = drv__fs_checkpath(L, 1, F, "path");
  size_t n;
  const char *data;
  mode_t mode = (mode_t)-1;
  drv_fsguard *g;
  int err;
  if (lua_type(L, 2) != LUA_TSTRING) return drv__argerror(L, F, "data", "string", 2);
  data = lua_tolstring(L, 2, &n);
  drv__fs_checkopts(L, 3, F);
  if (lua_istable(L, 3)) {
    lua_getfield(L, 3, "mode");
    mode = drv__fs_checkmode(L, -1, F, "opts.mode", (mode_t)-1);
    lua_pop(L, 1);
  }
  g = drv__fsguard(L);
  if ((err = drv__atomic_begin(g, path)) != 0) return drv__fs_fail(L, F, path, err);
  if ((err = drv__write_all(g->fd, data, n)) != 0) return drv__fs_fail(L, F, path, err);
  if ((err = drv__atomic_commit(g, path, mode, 1)) != 0) return drv__fs_fail(L, F, path, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* fs.append(path, data) -> true; creates the file if needed. */
static int drv__l_append(lua_State *L) {
  static const char *F = "drover.fs.append";
  const char *path = drv__fs_checkpath(L, 1, F, "path");
  size_t n;
  const char *data;
  drv_fsguard *g;
  int err;
  if (lua_type(L, 2) != LUA_TSTRING) return drv__argerror(L, F, "data", "string", 2);
  data = lua_tolstring(L, 2, &n);
  g = drv__fsguard(L);
  g->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
  if (g->fd < 0) return drv__fs_fail(L, F, path, errno);
  if ((err = drv__write_all(g->fd, data, n)) != 0) return drv__fs_fail(L, F, path, err);
  err = close(g->fd) != 0 ? errno : 0;
  g->fd = -1;
  if (err) return drv__fs_fail(L, F, path, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- metadata ------------------------------------------------------------------------ */

/* fs.exists(path) -> boolean; follows symbolic links (a dangling link does
 * not exist), like test -e. */
static int drv__l_exists(lua_State *L) {
  struct stat st;
  const char *path = drv__fs_checkpath(L, 1, "drover.fs.exists", "path");
  lua_pushboolean(L, stat(path, &st) == 0);
  return 1;
}

static const char *drv__type_name(mode_t m) {
  if (S_ISREG(m)) return "file";
  if (S_ISDIR(m)) return "directory";
  if (S_ISLNK(m)) return "link";
  if (S_ISFIFO(m)) return "fifo";
  if (S_ISSOCK(m)) return "socket";
  if (S_ISCHR(m)) return "char";
  if (S_ISBLK(m)) return "block";
  return "unknown";
}

/* fs.stat(path) -> {type, size, mode, mtime} | nil, msg, errno.  Does not
 * follow a final symbolic link: a link reports type "link". */
static int drv__l_stat(lua_State *L) {
  static const char *F = "drover.fs.stat";
  const char *path = drv__fs_checkpath(L, 1, F, "path");
  struct stat st;
  if (lstat(path, &st) != 0) return drv__fs_fail(L, F, path, errno);
  lua_createtable(L, 0, 4);
  lua_pushstring(L, drv__type_name(st.st_mode));
  lua_setfield(L, -2, "type");
  lua_pushinteger(L, (lua_Integer)st.st_size);
  lua_setfield(L, -2, "size");
  lua_pushinteger(L, (lua_Integer)(st.st_mode & 07777));
  lua_setfield(L, -2, "mode");
  lua_pushnumber(L, (lua_Number)st.st_mtim.tv_sec + (lua_Number)st.st_mtim.tv_nsec / 1e9);
  lua_setfield(L, -2, "mtime");
  return 1;
}

/* ---- directories -------------------------------------------------------------------- */

/* fs.mkdir(path [, mode]) -> true; creates missing parents; an existing
 * directory is fine. */
static int drv__l_mkdir(lua_State *L) {
  static const char *F = "drover.fs.mkdir";
  const char *path = drv__fs_checkpath(L, 1, F, "path");
  mode_t mode = drv__fs_checkmode(L, 2, F, "mode", 0777);
  int err = drv__mkdir_p(path, mode);
  if (err) return drv__fs_fail(L, F, path, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* A path being walked by remove/walk, for error messages. */
typedef struct {
  char buf[PATH_MAX + 256];
  size_t len;
} drv_pathbuf;

static size_t drv__path_push(drv_pathbuf *p, const char *name) {
  size_t old = p->len;
  int w = snprintf(p->buf + p->len, sizeof p->buf - p->len, "%s%s",
                   p->len && p->buf[p->len - 1] != '/' ? "/" : "", name);
  if (w > 0) p->len += (size_t)w;
  if (p->len >= sizeof p->buf) p->len = sizeof p->buf - 1;
  return old;
}

static void drv__path_pop(drv_pathbuf *p, size_t old) {
  p->len = old;
  p->buf[old] = '\0';
}

/* Remove NAME under directory DIRFD and everything beneath, without following
 * links.  On failure p names the entry that could not be removed. */
static int drv__rmtree_at(int dirfd, const char *name, drv_pathbuf *p, int depth) {
  struct stat st;
  struct dirent *de;
  DIR *d;
  int fd, err = 0;
  size_t mark = drv__path_push(p, name);
  if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return errno;
  if (!S_ISDIR(st.st_mode)) {
    if (unlinkat(dirfd, name, 0) != 0) return errno;
    drv__path_pop(p, mark);
    return 0;
  }
  if (depth > DRV_MAX_DEPTH) return ELOOP;
  fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno;
  d = fdopendir(fd);
  if (d == NULL) {
    err = errno;
    close(fd);
    return err;
  }
  while ((errno = 0, de = readdir(d)) != NULL) {
    if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
    if ((err = drv__rmtree_at(fd, de->d_name, p, depth + 1)) != 0) break;
  }
  if (!err && errno) err = errno;
  closedir(d);
  if (err) return err;
  if (unlinkat(dirfd, name, AT_REMOVEDIR) != 0) return errno;
  drv__path_pop(p, mark);
  return 0;
}

/* fs.remove(path [, {recursive=true}]) -> true.  Without recursive, removes
 * a file, a link or an empty directory.  A missing path is an error. */
static int drv__l_remove(lua_State *L) {
  static const char *F = "drover.fs.remove";
  const char *path = drv__fs_checkpath(L, 1, F, "path");
  int recursive;
  struct stat st;
  drv__fs_checkopts(L, 2, F);
  recursive = drv__opt_bool(L, 2, F, "recursive", 0);
  if (lstat(path, &st) != 0) return drv__fs_fail(L, F, path, errno);
  if (S_ISDIR(st.st_mode)) {
    if (recursive) {
      drv_pathbuf *p = (drv_pathbuf *)lua_newuserdatauv(L, sizeof *p, 0);
      int err;
      p->len = 0;
      p->buf[0] = '\0';
      err = drv__rmtree_at(AT_FDCWD, path, p, 0);
      if (err) return drv__fs_fail(L, F, p->buf, err);
    } else if (rmdir(path) != 0) {
      return drv__fs_fail(L, F, path, errno);
    }
  } else if (unlink(path) != 0) {
    return drv__fs_fail(L, F, path, errno);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* fs.list(dir) -> sorted names (without "." and "..") */
static int drv__l_list(lua_State *L) {
  static const char *F = "drover.fs.list";
  const char *path = drv__fs_checkpath(L, 1, F, "dir");
  drv_fsguard *g = drv__fsguard(L);
  struct dirent *de;
  lua_Integer n = 0;
  g->dir = opendir(path);
  if (g->dir == NULL) return drv__fs_fail(L, F, path, errno);
  lua_newtable(L);
  while ((errno = 0, de = readdir(g->dir)) != NULL) {
    if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
    lua_pushstring(L, de->d_name);
    lua_rawseti(L, -2, ++n);
  }
  if (errno) return drv__fs_fail(L, F, path, errno);
  closedir(g->dir);
  g->dir = NULL;
  drv__sort_strings(L, -1);
  return 1;
}

/* fs.walk(dir [, {dirs=true}]) -> sorted list of paths relative to dir.
 *
 * Lists every non-directory beneath dir (regular files, links, ...); with
 * dirs=true, directories too.  Symbolic links are listed, never followed,
 * so a link cycle cannot make the walk loop.  A list rather than an
 * iterator: the result is sorted (deterministic, what tar and hashing want),
 * and directories stay open only while being read. */
static int drv__l_walk(lua_State *L) {
  static const char *F = "drover.fs.walk";
  const char *root = drv__fs_checkpath(L, 1, F, "dir");
  drv_fsguard *g;
  int withdirs, results, stack;
  lua_Integer nres = 0, nstack = 0;
  drv__fs_checkopts(L, 2, F);
  withdirs = drv__opt_bool(L, 2, F, "dirs", 0);
  g = drv__fsguard(L);
  g->fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (g->fd < 0) return drv__fs_fail(L, F, root, errno);
  lua_newtable(L);
  results = lua_gettop(L);
  lua_newtable(L);
  stack = lua_gettop(L);
  lua_pushliteral(L, "");
  lua_rawseti(L, stack, ++nstack);
  while (nstack > 0) {
    const char *rel;
    struct dirent *de;
    int fd;
    lua_rawgeti(L, stack, nstack);
    lua_pushnil(L);
    lua_rawseti(L, stack, nstack--);
    rel = lua_tostring(L, -1); /* anchored at the top until popped below */
    fd = openat(g->fd, *rel ? rel : ".", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || (g->dir = fdopendir(fd)) == NULL) {
      int err = errno;
      if (fd >= 0) close(fd);
      lua_pushfstring(L, "%s%s%s", root, *rel ? "/" : "", rel);
      return drv__fs_fail(L, F, lua_tostring(L, -1), err);
    }
    while ((errno = 0, de = readdir(g->dir)) != NULL) {
      int isdir;
      if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
      if (de->d_type == DT_UNKNOWN) {
        struct stat st;
        if (fstatat(fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
          int err = errno;
          lua_pushfstring(L, "%s/%s%s%s", root, rel, *rel ? "/" : "", de->d_name);
          return drv__fs_fail(L, F, lua_tostring(L, -1), err);
        }
        isdir = S_ISDIR(st.st_mode);
      } else {
        isdir = de->d_type == DT_DIR;
      }
      lua_pushfstring(L, "%s%s%s", rel, *rel ? "/" : "", de->d_name);
      if (isdir) {
        if (withdirs) {
          lua_pushvalue(L, -1);
          lua_rawseti(L, results, ++nres);
        }
        lua_rawseti(L, stack, ++nstack);
      } else {
        lua_rawseti(L, results, ++nres);
      }
    }
    if (errno) {
      int err = errno;
      lua_pushfstring(L, "%s%s%s", root, *rel ? "/" : "", rel);
      return drv__fs_fail(L, F, lua_tostring(L, -1), err);
    }
    closedir(g->dir);
    g->dir = NULL;
    lua_pop(L, 1); /* rel */
  }
  lua_settop(L, results);
  drv__sort_strings(L, results);
  return 1;
}

/* ---- copy, rename, tempdir ---------------------------------------------------------- */

/* fs.copy(src, dst) -> true.  Copies a regular file's contents and
 * permission bits; dst is replaced atomically (not fsynced). */
static int drv__l_copy(lua_State *L) {
  static const char *F = "drover.fs.copy";
  const char *src = drv__fs_checkpath(L, 1, F, "src");
  const char *dst = drv__fs_checkpath(L, 2, F, "dst");
  drv_fsguard *g = drv__fsguard(L);
  struct stat st;
  int err;
  g->fd2 = open(src, O_RDONLY | O_CLOEXEC);
  if (g->fd2 < 0) return drv__fs_fail(L, F, src, errno);
  if (fstat(g->fd2, &st) != 0) return drv__fs_fail(L, F, src, errno);
  if (S_ISDIR(st.st_mode)) return drv__fs_fail(L, F, src, EISDIR);
  if ((err = drv__atomic_begin(g, dst)) != 0) return drv__fs_fail(L, F, dst, err);
  /* copy_file_range only for regular files with a size: pseudo-files
   * (/proc) report 0 bytes and some kernels then copy nothing. */
  for (;;) {
    char buf[65536];
    ssize_t r, w;
    /* copy_file_range lets the kernel (or a reflinking filesystem) do the
     * work; fall back to read/write where it is not supported. */
    if (S_ISREG(st.st_mode) && st.st_size > 0) {
      w = copy_file_range(g->fd2, NULL, g->fd, NULL, 1 << 30, 0);
    } else {
      w = -1;
      errno = EINVAL;
    }
    if (w > 0) continue;
    if (w == 0) break;
    if (errno == EINTR) continue;
    if (errno != EXDEV && errno != ENOSYS && errno != EINVAL && errno != EOPNOTSUPP)
      return drv__fs_fail(L, F, src, errno);
    while ((r = read(g->fd2, buf, sizeof buf)) != 0) {
      if (r < 0) {
        if (errno == EINTR) continue;
        return drv__fs_fail(L, F, src, errno);
      }
      if ((err = drv__write_all(g->fd, buf, (size_t)r)) != 0) return drv__fs_fail(L, F, dst, err);
    }
    break;
  }
  if ((err = drv__atomic_commit(g, dst, st.st_mode & 07777, 0)) != 0)
    return drv__fs_fail(L, F, dst, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* fs.rename(from, to) -> true (rename(2): same filesystem, replaces to). */
static int drv__l_rename(lua_State *L) {
  static const char *F = "drover.fs.rename";
  const char *a = drv__fs_checkpath(L, 1, F, "from");
  const char *b = drv__fs_checkpath(L, 2, F, "to");
  if (rename(a, b) != 0) {
    int err = errno;
    lua_pushfstring(L, "%s -> %s", a, b);
    return drv__fs_fail(L, F, lua_tostring(L, -1), err);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* fs.tempdir([prefix]) -> path of a new private (0700) directory.  A prefix
 * without '/' is a name prefix under $TMPDIR (or /tmp); with a '/', it is
 * the path prefix itself ("/var/tmp/build-"). */
static int drv__l_tempdir(lua_State *L) {
  static const char *F = "drover.fs.tempdir";
  const char *prefix = "drover-";
  const char *dir = getenv("TMPDIR");
  luaL_Buffer b;
  char *tmpl;
  if (!lua_isnoneornil(L, 1)) prefix = drv__fs_checkpath(L, 1, F, "prefix");
  if (dir == NULL || *dir == '\0') dir = "/tmp";
  luaL_buffinit(L, &b);
  if (strchr(prefix, '/') == NULL) {
    luaL_addstring(&b, dir);
    if (dir[strlen(dir) - 1] != '/') luaL_addchar(&b, '/');
  }
  luaL_addstring(&b, prefix);
  luaL_addstring(&b, "XXXXXX");
  luaL_pushresult(&b);
  /* mkdtemp rewrites the template in place: work on a copy, then push it. */
  tmpl = (char *)lua_newuserdatauv(L, lua_rawlen(L, -1) + 1, 0);
  memcpy(tmpl, lua_tostring(L, -2), lua_rawlen(L, -2) + 1);
  if (mkdtemp(tmpl) == NULL) return drv__fs_fail(L, F, lua_tostring(L, -2), errno);
  lua_pushstring(L, tmpl);
  return 1;
}

int drv__open_fs(lua_State *L) {
  static const luaL_Reg funcs[] = {
      {"read", drv__l_read},       {"write", drv__l_write},     {"append", drv__l_append},
      {"exists", drv__l_exists},   {"stat", drv__l_stat},       {"mkdir", drv__l_mkdir},
      {"remove", drv__l_remove},   {"list", drv__l_list},       {"walk", drv__l_walk},
      {"copy", drv__l_copy},       {"rename", drv__l_rename},   {"tempdir", drv__l_tempdir},
      {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
  drv__open_tar(L);
  drv__open_sha256(L);
  return 0;
}
