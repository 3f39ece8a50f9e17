/*
 * tar.c -- drover.fs.tar and drover.fs.untar.
 *
 * The writer makes *reproducible* ustar archives: entries sorted by name,
 * a fixed mtime, uid/gid 0 with empty user and group names, modes reduced
 * to 0644/0755, no pax or GNU extensions.  The same inputs give the same
 * bytes, so an archive's sha256 can identify a package.  Names longer than
 * 100 bytes use the ustar prefix field (split at a '/'); what ustar cannot
 * hold is refused rather than written in an extension some readers lack.
 *
 * The extractor treats its input as hostile (packages come from elsewhere).
 * It reads ustar, pax ('x' path/linkpath/size) and GNU ('L'/'K' long names)
 * headers and works in two passes over the archive:
 *
 *   1. validate every entry, writing nothing: names must be relative with no
 *      '..' component; symbolic link targets must be relative and stay inside
 *      the destination (see drv__check_symlink); hard links must name a
 *      regular file that comes earlier in the archive; no entry may be placed
 *      beneath an earlier entry that is a link or a file; devices, fifos and
 *      other special types are refused.
 *   2. extract, opening every parent directory with O_NOFOLLOW relative to
 *      the destination, so that even a symlink already present in the
 *      destination cannot redirect a write outside it.
 *
 * Extracted files get the archive's permission bits masked with 0755 plus
 * owner read/write (no setuid, setgid, sticky or group/other write);
 * directories get owner rwx too; ownership is not restored; file mtimes are.
 * Synchronous, like the rest of drover.fs (see fs_int.h).
 */
#include "fs_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define TAR_BLK 512
#define TAR_RECORD (20 * TAR_BLK) /* GNU tar's default blocking factor */
#define TAR_NAME_MAX 4096         /* longest name or link target we accept */
#define TAR_EXT_MAX 65536         /* largest pax / GNU long-name payload we accept */

/* ustar header field offsets and widths (POSIX.1-1988) */
enum {
  H_NAME = 0, H_MODE = 100, H_UID = 108, H_GID = 116, H_SIZE = 124, H_MTIME = 136,
  H_CHKSUM = 148, H_TYPE = 156, H_LINK = 157, H_MAGIC = 257, H_VERSION = 263,
  H_UNAME = 265, H_GNAME = 297, H_DEVMAJ = 329, H_DEVMIN = 337, H_PREFIX = 345
};

/* ---- names ------------------------------------------------------------------ */

enum { N_OK, N_ABSOLUTE, N_DOTDOT, N_EMPTY, N_NUL, N_LONG };

static const char *const drv__name_errors[] = {
    "", "absolute name", "name contains a '..' component", "empty name",
    "name contains a NUL byte", "name too long"};

/* Canonical form of an archive name: no leading "./", no empty or "."
 * components, no trailing '/'.  Absolute names and '..' are errors, not
 * something to repair: an archive that has them is not to be trusted. */
static int drv__tar_normalize(const char *in, size_t n, char *out, size_t outsz) {
  size_t i = 0, o = 0;
  if (memchr(in, '\0', n)) return N_NUL;
  if (n > 0 && in[0] == '/') return N_ABSOLUTE;
  while (i < n) {
    size_t j = i;
    while (j < n && in[j] != '/') j++;
    if (j - i == 2 && in[i] == '.' && in[i + 1] == '.') return N_DOTDOT;
    if (j > i && !(j - i == 1 && in[i] == '.')) {
      if (o + (o > 0) + (j - i) >= outsz) return N_LONG;
      if (o > 0) out[o++] = '/';
      memcpy(out + o, in + i, j - i);
      o += j - i;
    }
    i = j + 1;
  }
  out[o] = '\0';
  return o == 0 ? N_EMPTY : N_OK;
}

/* Printable copy of an untrusted name for an error message. */
static void drv__sanitize(char *out, size_t outsz, const char *in) {
  size_t i;
  for (i = 0; in[i] && i + 4 < outsz; i++) {
    unsigned char c = (unsigned char)in[i];
    out[i] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
  }
  if (in[i]) {
    memcpy(out + i, "...", 4);
  } else {
    out[i] = '\0';
  }
}

/*
 * May a symbolic link named NAME (normalised) point at TARGET?
 *
 * Only if TARGET is relative and its '..' components all come first and do
 * not climb above the destination: "../lib/x.so" from "pkg/bin/x" is fine,
 * "../../x" from "pkg/x" is not.  A '..' after a normal component
 * ("a/../b") is refused even when it looks harmless, because "a" may itself
 * be a link: with l1 -> "." and l2 -> "l1/..", following l2 leaves the
 * destination although the text stays inside.  With the rule, every link
 * starts from a real directory (extraction never goes through links),
 * climbs within the destination, and then only descends; descending
 * through other links, which obey the same rule, never leaves it.
 */
static const char *drv__check_symlink(const char *name, const char *target) {
  int depth = 0, ups = 0, normal = 0;
  const char *p;
  if (*target == '\0') return "empty symbolic link target";
  if (*target == '/') return "symbolic link target is absolute";
  for (p = name; *p; p++) depth += *p == '/';
  for (p = target; *p;) {
    const char *e = strchr(p, '/');
    size_t n = e ? (size_t)(e - p) : strlen(p);
    if (n == 2 && p[0] == '.' && p[1] == '.') {
      if (normal) return "symbolic link target has '..' after a normal component";
      if (++ups > depth) return "symbolic link target points outside the destination";
    } else if (n > 0 && !(n == 1 && p[0] == '.')) {
      normal = 1;
    }
    p += n;
    if (*p == '/') p++;
  }
  return NULL;
}

/* ---- numbers ---------------------------------------------------------------- */

static void drv__put_octal(unsigned char *field, size_t width, uint64_t v) {
  size_t i = width - 1; /* the last byte is the NUL terminator */
  field[i] = '\0';
  while (i-- > 0) {
    field[i] = (unsigned char)('0' + (v & 7));
    v >>= 3;
  }
}

/* Parse an octal field: optional leading spaces, digits, then NUL or space.
 * Base-256 (GNU, for huge sizes) is refused.  Returns 0 or -1. */
static int drv__get_octal(const unsigned char *field, size_t width, uint64_t *v) {
  size_t i = 0;
  uint64_t x = 0;
  if (field[0] & 0x80) return -1;
  while (i < width && field[i] == ' ') i++;
  for (; i < width && field[i] >= '0' && field[i] <= '7'; i++) {
    if (x >> 60) return -1;
    x = x * 8 + (uint64_t)(field[i] - '0');
  }
  for (; i < width; i++)
    if (field[i] != ' ' && field[i] != '\0') return -1;
  *v = x;
  return 0;
}

static void drv__checksum(unsigned char *h, uint64_t *usum, int64_t *ssum) {
  size_t i;
  *usum = 0;
  *ssum = 0;
  for (i = 0; i < TAR_BLK; i++) {
    unsigned char c = (i >= H_CHKSUM && i < H_CHKSUM + 8) ? ' ' : h[i];
    *usum += c;
    *ssum += (signed char)c;
  }
}

/* ==== writer ==================================================================== */

typedef struct {
  const char *name; /* archive name: normalised, plus '/' for a directory */
  size_t nlen;
  size_t split;     /* length of the prefix field, 0 when the name fits alone */
  const char *path; /* source file, or NULL */
  const char *data; /* literal contents, or NULL */
  size_t dlen;
  int dir;
  int mode;         /* -1: from the source file's permission bits */
} drv_tarent;

typedef struct {
  int fd;
  unsigned char *buf;
  size_t len;
  int err;
} drv_tarout;

#define TAR_BUFSZ 65536

static void drv__out_flush(drv_tarout *w) {
  if (w->err == 0 && w->len > 0) w->err = drv__write_all(w->fd, w->buf, w->len);
  w->len = 0;
}

static void drv__out_put(drv_tarout *w, const void *p, size_t n) {
  const unsigned char *s = (const unsigned char *)p;
  while (n > 0 && w->err == 0) {
    size_t k = TAR_BUFSZ - w->len < n ? TAR_BUFSZ - w->len : n;
    memcpy(w->buf + w->len, s, k);
    w->len += k;
    s += k;
    n -= k;
    if (w->len == TAR_BUFSZ) drv__out_flush(w);
  }
}

static void drv__out_zeros(drv_tarout *w, size_t n) {
  static const unsigned char zero[TAR_BLK];
  while (n > 0) {
    size_t k = n < TAR_BLK ? n : TAR_BLK;
    drv__out_put(w, zero, k);
    n -= k;
  }
}

static int drv__ent_cmp(const void *a, const void *b) {
  const drv_tarent *x = (const drv_tarent *)a, *y = (const drv_tarent *)b;
  int c = memcmp(x->name, y->name, x->nlen < y->nlen ? x->nlen : y->nlen);
  if (c) return c;
  return x->nlen < y->nlen ? -1 : x->nlen > y->nlen;
}

/* Where to cut a long name between the prefix (155) and name (100) fields:
 * the first '/' that leaves at most 100 bytes after it.  0: fits as is;
 * (size_t)-1: cannot be represented. */
static size_t drv__ustar_split(const char *name, size_t n) {
  size_t i;
  if (n <= 100) return 0;
  for (i = n > 101 ? n - 101 : 0; i < n - 1; i++) {
    if (name[i] == '/') return i <= 155 && i > 0 ? i : (size_t)-1;
  }
  return (size_t)-1;
}

static void drv__header(unsigned char *h, const drv_tarent *e, uint64_t size, int mode,
                        uint64_t mtime) {
  uint64_t usum;
  int64_t ssum;
  memset(h, 0, TAR_BLK);
  if (e->split) {
    memcpy(h + H_PREFIX, e->name, e->split);
    memcpy(h + H_NAME, e->name + e->split + 1, e->nlen - e->split - 1);
  } else {
    memcpy(h + H_NAME, e->name, e->nlen);
  }
  drv__put_octal(h + H_MODE, 8, (uint64_t)mode);
  drv__put_octal(h + H_UID, 8, 0);
  drv__put_octal(h + H_GID, 8, 0);
  drv__put_octal(h + H_SIZE, 12, size);
  drv__put_octal(h + H_MTIME, 12, mtime);
  h[H_TYPE] = e->dir ? '5' : '0';
  memcpy(h + H_MAGIC, "ustar", 6); /* "ustar\0" then version "00": POSIX ustar */
  memcpy(h + H_VERSION, "00", 2);
  drv__put_octal(h + H_DEVMAJ, 8, 0);
  drv__put_octal(h + H_DEVMIN, 8, 0);
  drv__checksum(h, &usum, &ssum);
  /* six digits, NUL, space: the historical layout every reader accepts */
  drv__put_octal(h + H_CHKSUM, 7, usum);
  h[H_CHKSUM + 7] = ' ';
}

/* Read entries[i] into e, raising on anything malformed. */
static void drv__tar_entry(lua_State *L, int entries, int anchor, lua_Integer i, drv_tarent *e) {
  static const char *F = "drover.fs.tar";
  char arg[64], *norm;
  const char *s, *type;
  size_t n;
  int t, rc;
  lua_rawgeti(L, entries, i);
  if (!lua_istable(L, -1)) {
    snprintf(arg, sizeof arg, "entries[%lld]", (long long)i);
    drv__argerror(L, F, arg, "table", -1);
  }
  memset(e, 0, sizeof *e);
  e->mode = -1;

  lua_getfield(L, -1, "name");
  if (lua_type(L, -1) != LUA_TSTRING) {
    snprintf(arg, sizeof arg, "entries[%lld].name", (long long)i);
    drv__argerror(L, F, arg, "string", -1);
  }
  s = lua_tolstring(L, -1, &n);
  norm = (char *)lua_newuserdatauv(L, n + 2, 0);
  rc = drv__tar_normalize(s, n, norm, n + 1);
  if (rc != N_OK)
    luaL_error(L, "%s: bad argument 'entries[%d].name' (%s: \"%s\")", F, (int)i,
               drv__name_errors[rc], s);

  lua_getfield(L, -3, "type");
  type = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
  if (lua_isnil(L, -1) || (type && strcmp(type, "file") == 0)) {
    e->dir = 0;
  } else if (type && strcmp(type, "directory") == 0) {
    e->dir = 1;
  } else {
    luaL_error(L, "%s: bad argument 'entries[%d].type' (\"file\" or \"directory\" expected)", F,
               (int)i);
  }
  lua_pop(L, 1);
  if (e->dir) strcat(norm, "/");
  lua_pushstring(L, norm);
  e->name = lua_tolstring(L, -1, &e->nlen);
  lua_rawseti(L, anchor, (lua_Integer)lua_rawlen(L, anchor) + 1); /* keeps e->name alive */
  lua_pop(L, 2); /* norm, name */

  lua_getfield(L, -1, "path");
  lua_getfield(L, -2, "data");
  t = (lua_type(L, -2) != LUA_TNIL) + 2 * (lua_type(L, -1) != LUA_TNIL);
  if (e->dir ? t != 0 : (t != 1 && t != 2))
    luaL_error(L, "%s: bad argument 'entries[%d]' (%s)", F, (int)i,
               e->dir ? "a directory takes neither 'path' nor 'data'"
                      : "a file needs exactly one of 'path' or 'data'");
  if (t == 1) {
    snprintf(arg, sizeof arg, "entries[%lld].path", (long long)i);
    e->path = drv__fs_checkpath(L, -2, F, arg);
  } else if (t == 2) {
    if (lua_type(L, -1) != LUA_TSTRING) {
      snprintf(arg, sizeof arg, "entries[%lld].data", (long long)i);
      drv__argerror(L, F, arg, "string", -1);
    }
    e->data = lua_tolstring(L, -1, &e->dlen);
  }
  lua_rawseti(L, anchor, (lua_Integer)lua_rawlen(L, anchor) + 1);
  lua_rawseti(L, anchor, (lua_Integer)lua_rawlen(L, anchor) + 1);

  lua_getfield(L, -1, "mode");
  if (!lua_isnil(L, -1)) {
    snprintf(arg, sizeof arg, "entries[%lld].mode", (long long)i);
    e->mode = (int)drv__fs_checkmode(L, -1, F, arg, 0);
  }
  lua_pop(L, 2); /* mode, entry */

  e->split = drv__ustar_split(e->name, e->nlen);
  if (e->split == (size_t)-1)
    luaL_error(L,
               "%s: bad argument 'entries[%d].name' (cannot be stored in a ustar header: "
               "it needs a '/' with at most 155 bytes before it and 1 to 100 after it): %s",
               F, (int)i, e->name);
}

/* fs.tar(out_path, entries [, {mtime=0}]) -> true | nil, msg, errno */
static int drv__l_tar(lua_State *L) {
  static const char *F = "drover.fs.tar";
  const char *out = drv__fs_checkpath(L, 1, F, "out_path");
  lua_Integer i, n;
  uint64_t mtime;
  double dm;
  drv_tarent *ents;
  drv_tarout w;
  drv_fsguard *g;
  int anchor, err;
  unsigned char h[TAR_BLK];
  if (!lua_istable(L, 2)) return drv__argerror(L, F, "entries", "table", 2);
  if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
    return drv__argerror(L, F, "opts", "table or nil", 3);
  dm = drv__opt_number(L, 3, F, "mtime", 0);
  if (!(dm >= 0 && dm <= 077777777777.0) || dm != (double)(uint64_t)dm)
    return luaL_error(L, "%s: bad option 'mtime' (an integer from 0 to 8^11-1 expected)", F);
  mtime = (uint64_t)dm;
  lua_settop(L, 3);

  /* Everything is checked and sorted before the output file exists. */
  n = (lua_Integer)lua_rawlen(L, 2);
  lua_newtable(L);
  anchor = lua_gettop(L);
  ents = (drv_tarent *)lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1) * sizeof *ents, 0);
  for (i = 1; i <= n; i++) drv__tar_entry(L, 2, anchor, i, &ents[i - 1]);
  qsort(ents, (size_t)n, sizeof *ents, drv__ent_cmp);
  for (i = 0; i < n; i++) {
    const drv_tarent *e = &ents[i];
    size_t base = e->dir ? e->nlen - 1 : e->nlen;
    lua_Integer lo = i + 1, hi = n;
    if (i + 1 < n && drv__ent_cmp(e, &ents[i + 1]) == 0)
      return luaL_error(L, "%s: bad argument 'entries' (duplicate name '%s')", F, e->name);
    if (e->dir) continue;
    /* A file that is also the parent of another entry: look for "name/". */
    while (lo < hi) {
      lua_Integer mid = (lo + hi) / 2;
      const drv_tarent *m = &ents[mid];
      int c = memcmp(m->name, e->name, m->nlen < base ? m->nlen : base);
      if (c < 0 || (c == 0 && (m->nlen <= base || (unsigned char)m->name[base] < '/')))
        lo = mid + 1;
      else
        hi = mid;
    }
    if (lo < n && ents[lo].nlen > base && memcmp(ents[lo].name, e->name, base) == 0 &&
        ents[lo].name[base] == '/')
      return luaL_error(L, "%s: bad argument 'entries' ('%s' is a file and a directory)", F,
                        e->name);
  }

  g = drv__fsguard(L);
  if ((err = drv__atomic_begin(g, out)) != 0) return drv__fs_fail(L, F, out, err);
  g->mem = malloc(TAR_BUFSZ);
  if (g->mem == NULL) return drv__fs_fail(L, F, out, ENOMEM);
  w.fd = g->fd;
  w.buf = (unsigned char *)g->mem;
  w.len = 0;
  w.err = 0;

  for (i = 0; i < n && w.err == 0; i++) {
    const drv_tarent *e = &ents[i];
    uint64_t size = 0;
    int mode = e->mode;
    struct stat st;
    if (e->dir) {
      mode = 0755;
    } else if (e->data) {
      size = e->dlen;
      if (mode < 0) mode = 0644;
    } else {
      g->fd2 = open(e->path, O_RDONLY | O_CLOEXEC);
      if (g->fd2 < 0 || fstat(g->fd2, &st) != 0) return drv__fs_fail(L, F, e->path, errno);
      if (!S_ISREG(st.st_mode))
        return drv__fs_failmsg(L, F, e->path,
                               S_ISDIR(st.st_mode) ? "is a directory (use type=\"directory\")"
                                                   : "not a regular file");
      size = (uint64_t)st.st_size;
      if (mode < 0) mode = (int)(st.st_mode & 07777);
    }
    if (size > 077777777777ULL) return drv__fs_failmsg(L, F, e->name, "larger than 8 GiB");
    mode = (mode & 0111) ? 0755 : 0644;
    drv__header(h, e, size, mode, mtime);
    drv__out_put(&w, h, TAR_BLK);
    if (e->data) {
      drv__out_put(&w, e->data, e->dlen);
    } else if (e->path) {
      uint64_t left = size;
      char extra;
      while (left > 0 && w.err == 0) {
        /* read straight into the output buffer */
        size_t room = TAR_BUFSZ - w.len;
        ssize_t r = read(g->fd2, w.buf + w.len, room < left ? room : (size_t)left);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return drv__fs_fail(L, F, e->path, errno);
        if (r == 0) return drv__fs_failmsg(L, F, e->path, "file shrank while being archived");
        w.len += (size_t)r;
        left -= (uint64_t)r;
        if (w.len == TAR_BUFSZ) drv__out_flush(&w);
      }
      if (w.err) break;
      if (read(g->fd2, &extra, 1) > 0)
        return drv__fs_failmsg(L, F, e->path, "file grew while being archived");
      close(g->fd2);
      g->fd2 = -1;
    }
    drv__out_zeros(&w, (size_t)((TAR_BLK - size % TAR_BLK) % TAR_BLK));
  }
  /* end of archive: two zero blocks, then pad to a whole record */
  drv__out_zeros(&w, 2 * TAR_BLK);
  drv__out_flush(&w);
  if (w.err) return drv__fs_fail(L, F, out, w.err);
  {
    off_t end = lseek(g->fd, 0, SEEK_CUR);
    if (end < 0) return drv__fs_fail(L, F, out, errno);
    if (end % TAR_RECORD) {
      drv__out_zeros(&w, (size_t)(TAR_RECORD - end % TAR_RECORD));
      drv__out_flush(&w);
      if (w.err) return drv__fs_fail(L, F, out, w.err);
    }
  }
  if ((err = drv__atomic_commit(g, out, (mode_t)-1, 1)) != 0) return drv__fs_fail(L, F, out, err);
  lua_pushboolean(L, 1);
  return 1;
}

/* ==== reader ==================================================================== */

typedef struct {
  int fd;
  uint64_t off, fsize;
  /* the current entry */
  char type;        /* '0' file, '5' directory, '2' symlink, '1' hard link */
  char name[TAR_NAME_MAX + 1]; /* normalised; "" for the archive's root "./" */
  char link[TAR_NAME_MAX + 1];
  char raw[TAR_NAME_MAX + 1];  /* name as stored, for messages */
  uint64_t size, data_off;
  unsigned mode;
  uint64_t mtime;
  /* pending pax / GNU overrides for the next entry */
  char pname[TAR_NAME_MAX + 1], plink[TAR_NAME_MAX + 1];
  int has_pname, has_plink, has_psize;
  uint64_t psize;
  /* pass 2: what it made, as a list at stack index `created` of `L`
   * (directories with a trailing '/'), so that a failure can remove it */
  lua_State *L;
  int created;
  char err[1024];
  char ext[TAR_EXT_MAX + 1];   /* extension payloads; file data buffer when extracting */
} drv_untar;

static int drv__ut_error(drv_untar *u, const char *entry, const char *fmt, ...) {
  char what[512], safe[300];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  if (entry) {
    drv__sanitize(safe, sizeof safe, entry);
    snprintf(u->err, sizeof u->err, "entry '%s': %s", safe, what);
  } else {
    snprintf(u->err, sizeof u->err, "%s (at offset %llu)", what, (unsigned long long)u->off);
  }
  return -1;
}

static int drv__pread_all(int fd, void *buf, size_t n, uint64_t off) {
  char *p = (char *)buf;
  while (n > 0) {
    ssize_t r = pread(fd, p, n, (off_t)off);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return r < 0 ? errno : EIO;
    p += r;
    n -= (size_t)r;
    off += (uint64_t)r;
  }
  return 0;
}

/* Copy a header field, NUL-terminated only when shorter than its width,
 * into a C string. */
static void drv__field(char *out, const char *in, size_t width) {
  size_t n = strnlen(in, width);
  memcpy(out, in, n);
  out[n] = '\0';
}

/* Parse pax records "LEN key=value\n" into the pending overrides. */
static int drv__parse_pax(drv_untar *u, size_t size) {
  size_t pos = 0;
  while (pos < size) {
    size_t len = 0, i = pos, klen, vlen;
    const char *key, *val;
    while (i < size && u->ext[i] >= '0' && u->ext[i] <= '9' && len < TAR_EXT_MAX)
      len = len * 10 + (size_t)(u->ext[i++] - '0');
    if (i >= size || u->ext[i] != ' ' || len == 0 || pos + len > size ||
        u->ext[pos + len - 1] != '\n')
      return drv__ut_error(u, NULL, "malformed pax extended header");
    key = u->ext + i + 1;
    val = memchr(key, '=', (size_t)(u->ext + pos + len - 1 - key));
    if (val == NULL) return drv__ut_error(u, NULL, "malformed pax extended header");
    klen = (size_t)(val - key);
    val++;
    vlen = (size_t)(u->ext + pos + len - 1 - val);
    if ((klen == 4 && memcmp(key, "path", 4) == 0) ||
        (klen == 8 && memcmp(key, "linkpath", 8) == 0)) {
      char *dst = klen == 4 ? u->pname : u->plink;
      if (vlen > TAR_NAME_MAX)
        return drv__ut_error(u, NULL, "pax %.*s longer than %d bytes", (int)klen, key,
                             TAR_NAME_MAX);
      if (memchr(val, '\0', vlen))
        return drv__ut_error(u, NULL, "pax %.*s contains a NUL byte", (int)klen, key);
      memcpy(dst, val, vlen);
      dst[vlen] = '\0';
      if (klen == 4)
        u->has_pname = 1;
      else
        u->has_plink = 1;
    } else if (klen == 4 && memcmp(key, "size", 4) == 0) {
      uint64_t s = 0;
      size_t k;
      if (vlen == 0 || vlen > 18) return drv__ut_error(u, NULL, "bad pax size");
      for (k = 0; k < vlen; k++) {
        if (val[k] < '0' || val[k] > '9') return drv__ut_error(u, NULL, "bad pax size");
        s = s * 10 + (uint64_t)(val[k] - '0');
      }
      u->psize = s;
      u->has_psize = 1;
    }
    pos += len;
  }
  return 0;
}

/* Advance to the next real entry.  1: an entry is in u; 0: end; -1: error. */
static int drv__ut_next(drv_untar *u) {
  unsigned char h[TAR_BLK];
  for (;;) {
    uint64_t size, usum, stored, mode, mtime, end;
    int64_t ssum;
    int err, i, rc, zero = 1;
    char type, *name = u->raw;
    if (u->off == u->fsize) {
      if (u->has_pname || u->has_plink || u->has_psize)
        return drv__ut_error(u, NULL, "archive ends after an extended header");
      return 0; /* no end-of-archive blocks: tolerated, as GNU tar does */
    }
    if (u->off + TAR_BLK > u->fsize) return drv__ut_error(u, NULL, "truncated archive");
    if ((err = drv__pread_all(u->fd, h, TAR_BLK, u->off)) != 0)
      return drv__ut_error(u, NULL, "read error: %s", strerror(err));
    for (i = 0; i < TAR_BLK && zero; i++) zero = h[i] == 0;
    if (zero) return 0;
    drv__checksum(h, &usum, &ssum);
    if (drv__get_octal(h + H_CHKSUM, 8, &stored) != 0 ||
        (stored != usum && (int64_t)stored != ssum))
      return drv__ut_error(u, NULL, "bad header checksum (not a tar archive, or corrupt)");
    if (drv__get_octal(h + H_SIZE, 12, &size) != 0)
      return drv__ut_error(u, NULL, "bad size field (base-256 sizes are not supported)");
    type = (char)h[H_TYPE];
    if (u->has_psize && type != 'x' && type != 'g' && type != 'L' && type != 'K') size = u->psize;
    if (size > u->fsize - u->off - TAR_BLK) return drv__ut_error(u, NULL, "truncated archive");
    u->data_off = u->off + TAR_BLK;
    end = u->data_off + (size + TAR_BLK - 1) / TAR_BLK * TAR_BLK;
    if (type == 'x' || type == 'g' || type == 'L' || type == 'K') {
      if (size > TAR_EXT_MAX)
        return drv__ut_error(u, NULL, "extended header larger than %d bytes", TAR_EXT_MAX);
      if ((err = drv__pread_all(u->fd, u->ext, (size_t)size, u->data_off)) != 0)
        return drv__ut_error(u, NULL, "read error: %s", strerror(err));
      u->ext[size] = '\0';
      if (type == 'x' && drv__parse_pax(u, (size_t)size) != 0) return -1;
      if (type == 'L' || type == 'K') {
        size_t n = strnlen(u->ext, (size_t)size);
        if (n > TAR_NAME_MAX)
          return drv__ut_error(u, NULL, "GNU long name longer than %d bytes", TAR_NAME_MAX);
        memcpy(type == 'L' ? u->pname : u->plink, u->ext, n + 1);
        if (type == 'L')
          u->has_pname = 1;
        else
          u->has_plink = 1;
      }
      u->off = end > u->fsize ? u->fsize : end;
      continue;
    }

    /* a real entry: its name, from the overrides or the header */
    if (u->has_pname) {
      strcpy(name, u->pname);
    } else if (memcmp(h + H_MAGIC, "ustar\0", 6) == 0 && h[H_PREFIX] != '\0') {
      /* the prefix field exists only in POSIX ustar; GNU's "ustar  " keeps
       * other data there */
      drv__field(name, (const char *)h + H_PREFIX, 155);
      strcat(name, "/");
      drv__field(name + strlen(name), (const char *)h + H_NAME, 100);
    } else {
      drv__field(name, (const char *)h + H_NAME, 100);
    }
    if (u->has_plink) {
      strcpy(u->link, u->plink);
    } else {
      drv__field(u->link, (const char *)h + H_LINK, 100);
    }
    u->has_pname = u->has_plink = u->has_psize = 0;
    if (drv__get_octal(h + H_MODE, 8, &mode) != 0 || drv__get_octal(h + H_MTIME, 12, &mtime) != 0)
      return drv__ut_error(u, name, "bad mode or mtime field");

    switch (type) {
      case '0':
      case '\0':
      case '7':
        /* old archives mark directories with a trailing '/' only */
        type = name[0] && name[strlen(name) - 1] == '/' ? '5' : '0';
        break;
      case '5':
      case '2':
      case '1':
        break;
      case '3':
      case '4':
        return drv__ut_error(u, name, "device files are not allowed");
      case '6':
        return drv__ut_error(u, name, "fifos are not allowed");
      default:
        return drv__ut_error(u, name, "unsupported entry type '%c'",
                             type > 32 && type < 127 ? type : '?');
    }
    rc = drv__tar_normalize(name, strlen(name), u->name, sizeof u->name);
    if (rc == N_EMPTY && type == '5') {
      u->name[0] = '\0'; /* "./": the destination itself */
    } else if (rc != N_OK) {
      return drv__ut_error(u, name, "%s", drv__name_errors[rc]);
    }
    u->type = type;
    u->size = type == '0' ? size : 0;
    u->mode = (unsigned)mode;
    u->mtime = mtime;
    u->off = end > u->fsize ? u->fsize : end;
    return 1;
  }
}

/* Pass 2 made NAME[0..len) (a directory if dir): note it for drv__ut_undo. */
static void drv__ut_made(drv_untar *u, const char *name, size_t len, int dir) {
  if (u->L == NULL) return;
  lua_pushlstring(u->L, name, len);
  if (dir) {
    lua_pushliteral(u->L, "/");
    lua_concat(u->L, 2);
  }
  lua_rawseti(u->L, u->created, (lua_Integer)lua_rawlen(u->L, u->created) + 1);
}

/* Open the directory that will hold NAME (creating missing directories),
 * never following a symbolic link.  Returns a descriptor or -1 with a
 * message in u->err; *base points at NAME's last component. */
static int drv__ut_parent(drv_untar *u, int destfd, const char *name, const char **base,
                          int create) {
  char comp[TAR_NAME_MAX + 1];
  const char *p = name, *slash;
  int cur = openat(destfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (cur < 0) return drv__ut_error(u, name, "cannot open destination: %s", strerror(errno));
  while ((slash = strchr(p, '/')) != NULL) {
    int fd;
    memcpy(comp, p, (size_t)(slash - p));
    comp[slash - p] = '\0';
    fd = openat(cur, comp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT && create) {
      if (mkdirat(cur, comp, 0755) == 0) {
        drv__ut_made(u, name, (size_t)(slash - name), 1);
      } else if (errno != EEXIST) {
        int e = errno;
        close(cur);
        return drv__ut_error(u, name, "cannot create directory '%.*s': %s", (int)(slash - name),
                             name, strerror(e));
      }
      fd = openat(cur, comp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    }
    if (fd < 0) {
      int e = errno;
      close(cur);
      if (e == ELOOP || e == ENOTDIR)
        return drv__ut_error(u, name,
                             "'%.*s' in the destination is a symbolic link or not a directory",
                             (int)(slash - name), name);
      return drv__ut_error(u, name, "cannot open '%.*s': %s", (int)(slash - name), name,
                           strerror(e));
    }
    close(cur);
    cur = fd;
    p = slash + 1;
  }
  *base = p;
  return cur;
}

/* Make room for a non-directory at base: remove what is there unless it is
 * a directory. */
static int drv__ut_clear(drv_untar *u, int pfd, const char *base) {
  struct stat st;
  if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) != 0) return 0;
  if (S_ISDIR(st.st_mode))
    return drv__ut_error(u, u->name, "a directory of that name exists in the destination");
  if (unlinkat(pfd, base, 0) != 0)
    return drv__ut_error(u, u->name, "cannot replace: %s", strerror(errno));
  return 0;
}

static int drv__ut_extract(drv_untar *u, int destfd) {
  const char *base;
  int pfd, rc = 0;
  if (u->name[0] == '\0') return 0; /* the root entry "./" */
  pfd = drv__ut_parent(u, destfd, u->name, &base, 1);
  if (pfd < 0) return -1;
  switch (u->type) {
    case '5': {
      struct stat st;
      int fd;
      if (mkdirat(pfd, base, 0700) == 0) {
        drv__ut_made(u, u->name, strlen(u->name), 1);
      } else if (errno != EEXIST) {
        rc = drv__ut_error(u, u->name, "cannot create directory: %s", strerror(errno));
        break;
      }
      fd = openat(pfd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (fd < 0) {
        rc = drv__ut_error(u, u->name,
                           fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0
                               ? "exists in the destination and is not a directory"
                               : "cannot open directory");
        break;
      }
      fchmod(fd, (u->mode & 0755) | 0700);
      close(fd);
      break;
    }
    case '0': {
      uint64_t left = u->size, off = u->data_off;
      struct timespec ts[2];
      int fd, err;
      if ((rc = drv__ut_clear(u, pfd, base)) != 0) break;
      fd = openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
      if (fd < 0) {
        rc = drv__ut_error(u, u->name, "cannot create: %s", strerror(errno));
        break;
      }
      drv__ut_made(u, u->name, strlen(u->name), 0);
      while (left > 0) {
        size_t k = left < TAR_EXT_MAX ? (size_t)left : TAR_EXT_MAX;
        if ((err = drv__pread_all(u->fd, u->ext, k, off)) != 0 ||
            (err = drv__write_all(fd, u->ext, k)) != 0) {
          rc = drv__ut_error(u, u->name, "%s", strerror(err));
          break;
        }
        left -= k;
        off += k;
      }
      fchmod(fd, (u->mode & 0755) | 0600);
      ts[0].tv_sec = ts[1].tv_sec = (time_t)u->mtime;
      ts[0].tv_nsec = ts[1].tv_nsec = 0;
      futimens(fd, ts);
      if (close(fd) != 0 && rc == 0) rc = drv__ut_error(u, u->name, "%s", strerror(errno));
      break;
    }
    case '2':
      if ((rc = drv__ut_clear(u, pfd, base)) != 0) break;
      if (symlinkat(u->link, pfd, base) != 0)
        rc = drv__ut_error(u, u->name, "cannot create symbolic link: %s", strerror(errno));
      else
        drv__ut_made(u, u->name, strlen(u->name), 0);
      break;
    case '1': {
      const char *tbase;
      struct stat st;
      int tfd = drv__ut_parent(u, destfd, u->link, &tbase, 0);
      if (tfd < 0) {
        rc = -1;
        break;
      }
      if (fstatat(tfd, tbase, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) {
        rc = drv__ut_error(u, u->name, "hard link target is not a regular file in the destination");
      } else if ((rc = drv__ut_clear(u, pfd, base)) == 0 && linkat(tfd, tbase, pfd, base, 0) != 0) {
        rc = drv__ut_error(u, u->name, "cannot create hard link: %s", strerror(errno));
      } else if (rc == 0) {
        drv__ut_made(u, u->name, strlen(u->name), 0);
      }
      close(tfd);
      break;
    }
  }
  close(pfd);
  return rc;
}

/* Link checks shared by both passes; the hard link target is normalised
 * into u->link. */
static int drv__ut_check_links(drv_untar *u) {
  if (u->type == '2') {
    const char *why = drv__check_symlink(u->name, u->link);
    if (why) {
      char safe[300];
      drv__sanitize(safe, sizeof safe, u->link);
      return drv__ut_error(u, u->name, "%s ('%s')", why, safe);
    }
  } else if (u->type == '1') {
    char norm[TAR_NAME_MAX + 1];
    int rc = drv__tar_normalize(u->link, strlen(u->link), norm, sizeof norm);
    if (rc != N_OK) {
      char safe[300];
      drv__sanitize(safe, sizeof safe, u->link);
      return drv__ut_error(u, u->name, "hard link target '%s': %s", safe, drv__name_errors[rc]);
    }
    strcpy(u->link, norm);
  }
  return 0;
}

/* Pass 1 checks that need the whole archive: what each name is (table at
 * `types`: name -> type letter) and that nothing goes beneath a link. */
static int drv__ut_check_tree(lua_State *L, drv_untar *u, int types) {
  char *p;
  int prev;
  if (u->name[0] == '\0') return 0;
  for (p = strchr(u->name, '/'); p; p = strchr(p + 1, '/')) {
    lua_pushlstring(L, u->name, (size_t)(p - u->name));
    if (lua_rawget(L, types) == LUA_TNUMBER && lua_tointeger(L, -1) != '5') {
      lua_pop(L, 1);
      return drv__ut_error(u, u->name, "'%.*s' is not a directory in this archive",
                           (int)(p - u->name), u->name);
    }
    lua_pop(L, 1);
  }
  if (u->type == '1') {
    lua_pushstring(L, u->link);
    prev = lua_rawget(L, types) == LUA_TNUMBER ? (int)lua_tointeger(L, -1) : 0;
    lua_pop(L, 1);
    if (prev != '0' && prev != '1')
      return drv__ut_error(u, u->name,
                           "hard link target '%s' is not a regular file earlier in the archive",
                           u->link);
  }
  lua_pushstring(L, u->name);
  prev = lua_rawget(L, types) == LUA_TNUMBER ? (int)lua_tointeger(L, -1) : 0;
  lua_pop(L, 1);
  if (prev && (prev == '5') != (u->type == '5'))
    return drv__ut_error(u, u->name, "appears twice, as a directory and as something else");
  return prev ? 0 : 1; /* 1: a new name */
}

/* Pass 2 failed: remove what it made, newest first, so that a failed
 * untar leaves no partial tree behind (a file it replaced stays gone:
 * ustar entries overwrite).  Best effort, never following a link; the
 * error that stopped the extraction stays in u->err. */
static void drv__ut_undo(drv_untar *u, int destfd) {
  char saved[sizeof u->err], name[TAR_NAME_MAX + 2];
  lua_Integer i;
  memcpy(saved, u->err, sizeof saved);
  for (i = (lua_Integer)lua_rawlen(u->L, u->created); i > 0; i--) {
    const char *s, *base;
    size_t len;
    int pfd, dir;
    lua_rawgeti(u->L, u->created, i);
    s = lua_tolstring(u->L, -1, &len);
    dir = len > 0 && s[len - 1] == '/';
    if (dir) len--;
    memcpy(name, s, len);
    name[len] = '\0';
    lua_pop(u->L, 1);
    if ((pfd = drv__ut_parent(u, destfd, name, &base, 0)) < 0) continue;
    unlinkat(pfd, base, dir ? AT_REMOVEDIR : 0);
    close(pfd);
  }
  memcpy(u->err, saved, sizeof saved);
}

/* fs.untar(archive_path, dest_dir) -> list of entry names | nil, msg */
static int drv__l_untar(lua_State *L) {
  static const char *F = "drover.fs.untar";
  const char *archive = drv__fs_checkpath(L, 1, F, "archive_path");
  const char *dest = drv__fs_checkpath(L, 2, F, "dest_dir");
  drv_untar *u;
  drv_fsguard *g;
  struct stat st;
  int types, names, rc, err, dest_made;
  lua_Integer count = 0;
  lua_settop(L, 2);
  lua_newtable(L);
  types = lua_gettop(L);
  lua_newtable(L);
  names = lua_gettop(L);
  u = (drv_untar *)lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, offsetof(drv_untar, err));
  g = drv__fsguard(L);
  g->fd = open(archive, O_RDONLY | O_CLOEXEC);
  if (g->fd < 0 || fstat(g->fd, &st) != 0) return drv__fs_fail(L, F, archive, errno);
  if (!S_ISREG(st.st_mode)) return drv__fs_failmsg(L, F, archive, "not a regular file");
  u->fd = g->fd;
  u->fsize = (uint64_t)st.st_size;

  /* pass 1: validate everything, write nothing */
  while ((rc = drv__ut_next(u)) == 1) {
    int fresh;
    if (drv__ut_check_links(u) != 0) return drv__fs_failmsg(L, F, archive, u->err);
    if ((fresh = drv__ut_check_tree(L, u, types)) < 0)
      return drv__fs_failmsg(L, F, archive, u->err);
    if (u->name[0] == '\0') continue;
    lua_pushstring(L, u->name);
    lua_pushinteger(L, u->type);
    lua_rawset(L, types);
    if (fresh) {
      lua_pushstring(L, u->name);
      lua_rawseti(L, names, ++count);
    }
  }
  if (rc < 0) return drv__fs_failmsg(L, F, archive, u->err);

  /* pass 2: extract (on failure, remove what it made, dest included) */
  dest_made = lstat(dest, &st) != 0;
  if ((err = drv__mkdir_p(dest, 0777)) != 0) return drv__fs_fail(L, F, dest, err);
  g->fd2 = open(dest, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (g->fd2 < 0) return drv__fs_fail(L, F, dest, errno);
  lua_newtable(L);
  u->L = L;
  u->created = lua_gettop(L);
  u->off = 0;
  while ((rc = drv__ut_next(u)) == 1) {
    /* the archive could have changed since pass 1: check again */
    if (drv__ut_check_links(u) != 0 || drv__ut_extract(u, g->fd2) != 0) break;
  }
  if (rc != 0) {
    drv__ut_undo(u, g->fd2);
    if (dest_made) rmdir(dest); /* only if nothing else appeared in it */
    return drv__fs_failmsg(L, F, archive, u->err);
  }
  lua_pushvalue(L, names);
  return 1;
}

int drv__open_tar(lua_State *L) {
  static const luaL_Reg funcs[] = {{"tar", drv__l_tar}, {"untar", drv__l_untar}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
