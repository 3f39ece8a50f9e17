/*
 * sha256.c -- drover.fs.sha256 and drover.fs.sha256_string, through
 * OpenSSL's EVP interface (the low-level SHA256_* functions are deprecated
 * in OpenSSL 3).  Synchronous like the rest of drover.fs.
 */
#include "fs_int.h"

#include <errno.h>
#include <fcntl.h>
#include "lazylib.h"
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* libcrypto is loaded on first use (lazylib.h): raise if it cannot be. */
static void drv__need_crypto(lua_State *L, const char *fname) {
  const char *err = drv__crypto_load();
  if (err) luaL_error(L, "%s: %s", fname, err);
}

static void drv__md_free(void *md) { EVP_MD_CTX_free((EVP_MD_CTX *)md); }

static void drv__push_hex(lua_State *L, const unsigned char *d, unsigned n) {
  static const char hex[] = "0123456789abcdef";
  char out[2 * EVP_MAX_MD_SIZE];
  unsigned i;
  for (i = 0; i < n; i++) {
    out[2 * i] = hex[d[i] >> 4];
    out[2 * i + 1] = hex[d[i] & 15];
  }
  lua_pushlstring(L, out, 2 * n);
}

/* fs.sha256(path) -> lowercase hex digest of the file's contents */
static int drv__l_sha256(lua_State *L) {
  static const char *F = "drover.fs.sha256";
  const char *path = drv__fs_checkpath(L, 1, F, "path");
  drv_fsguard *g;
  drv__need_crypto(L, F);
  g = drv__fsguard(L);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned dlen = 0;
  struct stat st;
  EVP_MD_CTX *md;
  g->fd = open(path, O_RDONLY | O_CLOEXEC);
  if (g->fd < 0) return drv__fs_fail(L, F, path, errno);
  if (fstat(g->fd, &st) != 0) return drv__fs_fail(L, F, path, errno);
  if (S_ISDIR(st.st_mode)) return drv__fs_fail(L, F, path, EISDIR);
  md = EVP_MD_CTX_new();
  if (md == NULL) return drv__fs_fail(L, F, path, ENOMEM);
  g->md = md;
  g->md_free = drv__md_free;
  if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1)
    return drv__fs_failmsg(L, F, path, "cannot initialise SHA-256");
  for (;;) {
    char buf[32768];
    ssize_t r = read(g->fd, buf, sizeof buf);
    if (r < 0) {
      if (errno == EINTR) continue;
      return drv__fs_fail(L, F, path, errno);
    }
    if (r == 0) break;
    EVP_DigestUpdate(md, buf, (size_t)r);
  }
  EVP_DigestFinal_ex(md, digest, &dlen);
  drv__push_hex(L, digest, dlen);
  return 1;
}

/* fs.sha256_string(data) -> lowercase hex digest of a string */
static int drv__l_sha256_string(lua_State *L) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned dlen = 0;
  size_t n;
  const char *s;
  if (lua_type(L, 1) != LUA_TSTRING)
    return drv__argerror(L, "drover.fs.sha256_string", "data", "string", 1);
  s = lua_tolstring(L, 1, &n);
  drv__need_crypto(L, "drover.fs.sha256_string");
  if (EVP_Digest(s, n, digest, &dlen, EVP_sha256(), NULL) != 1)
    return luaL_error(L, "drover.fs.sha256_string: SHA-256 failed");
  drv__push_hex(L, digest, dlen);
  return 1;
}

int drv__open_sha256(lua_State *L) {
  static const luaL_Reg funcs[] = {{"sha256", drv__l_sha256},
                                   {"sha256_string", drv__l_sha256_string},
                                   {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
