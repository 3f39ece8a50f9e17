/*
 * fs_int.h -- private interfaces shared by fs.c, tar.c and sha256.c.
 *
 * drover.fs makes plain synchronous system calls on the loop thread.  That
 * is a deliberate choice: the module is for local files a workflow reads
 * and writes (manifests, small artifacts, package archives), where a call
 * costs microseconds to a few milliseconds, and running them through the
 * libuv thread pool would buy nothing but a second code path.  Anything
 * slow or remote belongs to drover.proc or drover.http, which do wait.
 *
 * Because these calls are synchronous, every resource they hold (a file
 * descriptor, a malloc'd buffer, an unfinished temporary file, a digest
 * context) is owned by a *guard*: a userdata marked to-be-closed with
 * lua_toclose, so that a Lua error half way (out of memory while pushing a
 * result, a bad entry in a tar list) still releases it.
 */
#ifndef DROVER_FS_INT_H
#define DROVER_FS_INT_H

#include "drover_int.h"

#include <dirent.h>
#include <stddef.h>
#include <sys/types.h>

/* Every resource a synchronous fs call may hold.  Unused fields are -1/NULL;
 * drv__fsguard_release frees whatever is set and resets it, so it can run
 * early (the normal path) and again from __close/__gc (the error path). */
typedef struct drv_fsguard {
  int fd, fd2;
  DIR *dir;
  void *mem;
  char *tmp;                 /* a temporary file to unlink: the write was not committed */
  void *md;                  /* digest context, freed with md_free */
  void (*md_free)(void *md);
} drv_fsguard;

/* Push a new guard (to-be-closed) and return it.  It stays on the stack
 * until the C function returns. */
drv_fsguard *drv__fsguard(lua_State *L);
void drv__fsguard_release(drv_fsguard *g);

/* Argument checks that raise "FNAME: bad argument 'ARG' (...)". */
const char *drv__fs_checkpath(lua_State *L, int idx, const char *fname, const char *argname);
/* A permission mode: an integer (0 .. 07777) or a string of octal digits
 * ("755", "0644"); dflt when the argument is nil/none. */
mode_t drv__fs_checkmode(lua_State *L, int idx, const char *fname, const char *argname,
                         mode_t dflt);

/* Failure result, Lua io-style: pushes nil, "FNAME: PATH: strerror(err)", err
 * and returns 3. */
int drv__fs_fail(lua_State *L, const char *fname, const char *path, int err);
/* Same with a free-form reason instead of strerror: nil, "FNAME: PATH: WHY". */
int drv__fs_failmsg(lua_State *L, const char *fname, const char *path, const char *why);

/* Low-level helpers: they return 0 or an errno value and never raise. */
int drv__write_all(int fd, const void *buf, size_t n);
int drv__mkdir_p(const char *path, mode_t mode);

/*
 * Atomic replacement of a file: create a temporary file next to PATH (same
 * directory, so rename cannot cross filesystems), let the caller write it,
 * then fsync it, rename it over PATH and fsync the directory so the rename
 * itself is durable.  Readers see the old file or the new one, never half.
 *
 * drv__atomic_begin stores the temporary name in g->tmp and the descriptor
 * in g->fd.  The file is created with 0666 & ~umask like any new file;
 * drv__atomic_commit applies MODE when mode != (mode_t)-1, otherwise it keeps
 * the mode of the file being replaced, if any.
 */
int drv__atomic_begin(drv_fsguard *g, const char *path);
int drv__atomic_commit(drv_fsguard *g, const char *path, mode_t mode, int sync);

/* Sort the strings of the sequence at idx in place (byte order). */
void drv__sort_strings(lua_State *L, int idx);

/* tar.c and sha256.c add their functions to the table at the top. */
int drv__open_tar(lua_State *L);
int drv__open_sha256(lua_State *L);

#endif
