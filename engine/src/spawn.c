/*
 * spawn.c -- starting a child the way execvp would, for the fewest
 * syscalls drover's own process can spend on it.
 *
 * glibc's posix_spawn (what make and the shells use) clones the process
 * with CLONE_VM|CLONE_VFORK, as we do here, but on a stack it maps for
 * that one child and unmaps when the child has exec'd: an mmap, a munmap
 * and the page faults of a fresh stack on every spawn, plus a getrlimit to
 * size it and the pidfd_open drover then needs.  Here the stack is mapped
 * once per engine and kept (only one child at a time ever runs on it: the
 * parent waits, CLONE_VFORK, until the child has exec'd or exited), and
 * the clone hands back the child's pidfd itself (CLONE_PIDFD, Linux 5.2).
 * On the DAG of bench/dag.sh that was about a tenth of drover's CPU per
 * child.
 *
 * The child shares drover's memory until execve, so it calls nothing but
 * raw syscalls -- no malloc, no locks, no libc function an interposer (a
 * sanitizer) could wrap -- and it runs with every signal blocked (the
 * parent blocks them around the clone), so none of drover's handlers can
 * run in it.  Before unblocking them it sets every signal to its default
 * disposition, as libuv's children have them (SIGPIPE included, which
 * drover ignores, and glibc's internal real-time signals); it starts a new
 * session, puts its stdio in place, changes directory and execs.  A
 * failure is an errno it writes into the parent's memory before it exits.
 *
 * A name without a slash is looked up in the PATH of the child's
 * environment, in drover, with one access() per entry (make does the
 * same); posix_spawnp would search in the child, one failed execve per
 * entry, on the CPU the parent waits for.  A found path is remembered for
 * a second (DRV_PATH_TTL_MS) under the name and that PATH: a DAG that
 * runs the same program a thousand times searches once a second, not a
 * thousand times, where PATH has eight entries before /usr/bin.  Like a
 * shell's hash table, but it expires: a program installed since in an
 * earlier directory of PATH is found within a second; one removed or made
 * non-executable since is searched for again at once (its spawn fails).
 * A file the kernel cannot execute (ENOEXEC: a script without #!) is run
 * by /bin/sh, as execvp does.
 */
#include "drover_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434 /* Linux 5.3; the number is shared by (nearly) all architectures */
#endif

#define DRV_SPAWN_STACK (64 * 1024)
#define DRV_PATH_TTL_MS 1000
/* The kernel's sigset_t: 64 signals on every architecture but MIPS. */
#define DRV_KSIGSET ((_NSIG - 1) / 8)

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 8)
#define DRV_NO_SANITIZE __attribute__((no_sanitize("address", "undefined")))
#else
#define DRV_NO_SANITIZE
#endif

/* What the child needs, on the parent's stack; err is its answer. */
typedef struct {
  const drv_child *c;
  const char *path;
  char **argv;
  int err;
} drv_cargs;

/* The child, on the spawner's stack, sharing drover's memory. */
DRV_NO_SANITIZE static int drv__child_main(void *arg) {
  drv_cargs *a = (drv_cargs *)arg;
  const drv_child *c = a->c;
  /* Zeroes are SIG_DFL with no flags and an empty mask in every
   * architecture's struct sigaction; 64 bytes covers the largest. */
  static const unsigned long dfl[8] = {0};
  static const unsigned long none[4] = {0};
  int sig, i;
  for (sig = 1; sig < _NSIG; sig++)
    if (sig != SIGKILL && sig != SIGSTOP) syscall(SYS_rt_sigaction, sig, dfl, NULL, DRV_KSIGSET);
  if (syscall(SYS_setsid) < 0) goto fail;
  for (i = 0; i < 3; i++) {
    int fd = c->fd[i];
    if (fd == DRV_CHILD_KEEP) continue;
    if (fd == i) { /* inherited: only the copy the child gets loses close-on-exec */
      if (syscall(SYS_fcntl, i, F_SETFD, 0) < 0) goto fail;
      continue;
    }
    if (fd == DRV_CHILD_NULL) {
      long n = syscall(SYS_openat, AT_FDCWD, "/dev/null", (i == 0 ? O_RDONLY : O_RDWR) | O_CLOEXEC);
      if (n < 0) goto fail;
      fd = (int)n;
      if (fd == i) { /* fd i was closed: it is the one we got */
        if (syscall(SYS_fcntl, i, F_SETFD, 0) < 0) goto fail;
        continue;
      }
    }
    if (syscall(SYS_dup3, fd, i, 0) < 0) goto fail;
    if (c->fd[i] == DRV_CHILD_NULL && fd < 3) syscall(SYS_close, fd); /* a stdio slot of its own */
  }
  if (c->cwd && syscall(SYS_chdir, c->cwd) < 0) goto fail;
  syscall(SYS_rt_sigprocmask, SIG_SETMASK, none, NULL, DRV_KSIGSET);
  syscall(SYS_execve, a->path, a->argv, c->envp);
fail:
  a->err = errno ? errno : ENOEXEC;
  syscall(SYS_exit, 127);
  return 127;
}

static void drv__spawner_close(drv_res *r) {
  drv_spawner *sp = (drv_spawner *)(void *)((char *)r - offsetof(drv_spawner, res));
  int i;
  drv__res_unlink(r);
  sp->closed = 1;
  if (sp->stack) munmap(sp->stack, DRV_SPAWN_STACK);
  sp->stack = NULL;
  for (i = 0; i < DRV_PATH_CACHE; i++) {
    free(sp->cache[i].key);
    sp->cache[i].key = NULL;
  }
}

/* One clone: the child runs c with `path` and `argv`.  Returns 0 with
 * *pid and *pidfd set, or an errno (no child left behind). */
static int drv__clone(drv_spawner *sp, const drv_child *c, const char *path, char **argv, pid_t *pid,
                      int *pidfd) {
  static const unsigned long all[4] = {~0UL, ~0UL, ~0UL, ~0UL};
  unsigned long old[4]; /* a kernel sigset_t: 8 bytes, 16 on MIPS */
  drv_cargs a;
  int fd = -1, e, flags;
  pid_t p;
  a.c = c;
  a.path = path;
  a.argv = argv;
  a.err = 0;
  for (;;) {
    flags = CLONE_VM | CLONE_VFORK | SIGCHLD | (sp->no_clone_pidfd ? 0 : CLONE_PIDFD);
    /* No handler of drover's may run in the child, which shares its memory. */
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, all, old, DRV_KSIGSET);
    p = clone(drv__child_main, (char *)sp->stack + DRV_SPAWN_STACK, flags, &a, &fd);
    e = errno;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, old, NULL, DRV_KSIGSET);
    if (p >= 0) break;
    /* A kernel (or a seccomp filter) without CLONE_PIDFD: pidfd_open after. */
    if (e == EINVAL && !sp->no_clone_pidfd) { sp->no_clone_pidfd = 1; continue; }
    return e;
  }
  if (fd < 0) {
    fd = (int)syscall(SYS_pidfd_open, p, 0);
    e = errno;
  }
  if (a.err || fd < 0) { /* it exited (could not exec), or cannot be watched: reap it */
    if (fd >= 0) close(fd);
    else if (!a.err) kill(-p, SIGKILL);
    while (waitpid(p, NULL, 0) < 0 && errno == EINTR) {}
    return a.err ? a.err : e;
  }
  *pid = p;
  *pidfd = fd;
  return 0;
}

/* Start the file at `path` (execve's rules); ENOEXEC: by /bin/sh. */
static int drv__spawn_file(drv_spawner *sp, const drv_child *c, const char *path, pid_t *pid,
                           int *pidfd) {
  int r = drv__clone(sp, c, path, c->argv, pid, pidfd);
  if (r == ENOEXEC) {
    size_t argc = 0;
    char **sh;
    while (c->argv[argc]) argc++;
    sh = (char **)malloc(sizeof(char *) * (argc + 2));
    if (sh == NULL) return ENOMEM;
    sh[0] = (char *)"/bin/sh";
    sh[1] = (char *)path;
    memcpy(sh + 2, c->argv + 1, sizeof(char *) * argc); /* argv[1..], NULL */
    r = drv__clone(sp, c, "/bin/sh", sh, pid, pidfd);
    free(sh);
  }
  return r;
}

/* ---- the PATH cache ---- */

static uint64_t drv__ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* FNV-1a of name, a NUL, and PATH. */
static uint64_t drv__path_hash(const char *file, const char *path) {
  uint64_t h = 1469598103934665603ULL;
  const unsigned char *s;
  for (s = (const unsigned char *)file; *s; s++) h = (h ^ *s) * 1099511628211ULL;
  h *= 1099511628211ULL;
  for (s = (const unsigned char *)path; *s; s++) h = (h ^ *s) * 1099511628211ULL;
  return h;
}

/* The entry for (file, path), fresh or not; NULL if none. */
static drv_path_entry *drv__path_find(drv_spawner *sp, uint64_t h, const char *file, const char *path) {
  int i;
  for (i = 0; i < DRV_PATH_CACHE; i++) {
    drv_path_entry *e = &sp->cache[i];
    if (e->key && e->hash == h && strcmp(e->key, file) == 0 &&
        strcmp(e->key + strlen(file) + 1, path) == 0)
      return e;
  }
  return NULL;
}

/* Remember that `file` in `path` is `found` (an absolute path). */
static void drv__path_put(drv_spawner *sp, uint64_t h, const char *file, const char *path,
                          const char *found, uint64_t now) {
  size_t fl = strlen(file), pl = strlen(path), dl = strlen(found);
  drv_path_entry *e = drv__path_find(sp, h, file, path);
  char *key;
  int i;
  if (e == NULL) { /* a free slot, else the oldest */
    e = &sp->cache[0];
    for (i = 0; i < DRV_PATH_CACHE && e->key; i++)
      if (!sp->cache[i].key || sp->cache[i].at < e->at) e = &sp->cache[i];
  }
  key = (char *)malloc(fl + pl + dl + 3);
  if (key == NULL) return; /* not remembered: searched again next time */
  memcpy(key, file, fl + 1);
  memcpy(key + fl + 1, path, pl + 1);
  memcpy(key + fl + pl + 2, found, dl + 1);
  free(e->key);
  e->key = key;
  e->found = key + fl + pl + 2;
  e->hash = h;
  e->at = now;
}

static int drv__lookup_failed(int r) {
  return r == ENOENT || r == EACCES || r == ENOTDIR || r == ESTALE || r == ENODEV ||
         r == ETIMEDOUT || r == ELOOP || r == ENAMETOOLONG;
}

/* Search PATH as execvp would (an empty or relative entry is relative to
 * the cwd the child will have); EACCES anywhere is what is reported when
 * nothing could be run. */
static int drv__spawn_search(drv_spawner *sp, const drv_child *c, const char *path, uint64_t h,
                             uint64_t now, pid_t *pid, int *pidfd) {
  char cand[PATH_MAX + NAME_MAX + 2], check[2 * PATH_MAX + NAME_MAX + 4];
  const char *p, *end, *file = c->file;
  size_t flen = strlen(file);
  int got_eacces = 0, last = ENOENT;
  for (p = path;; p = end + 1) {
    size_t dlen;
    end = strchrnul(p, ':');
    dlen = (size_t)(end - p);
    if (dlen < PATH_MAX) {
      const char *chk = cand;
      int r;
      memcpy(cand, p, dlen);
      if (dlen) cand[dlen++] = '/';
      memcpy(cand + dlen, file, flen + 1);
      if (cand[0] != '/' && c->cwd) {
        snprintf(check, sizeof check, "%s/%s", c->cwd, cand);
        chk = check;
      }
      r = access(chk, X_OK) == 0 ? drv__spawn_file(sp, c, cand, pid, pidfd) : errno;
      if (r == 0) {
        /* A relative entry depends on a cwd that may change: not kept. */
        if (cand[0] == '/') drv__path_put(sp, h, file, path, cand, now);
        return 0;
      }
      if (r == EACCES) got_eacces = 1;
      if (!drv__lookup_failed(r)) return r;
      last = r;
    }
    if (*end == '\0') break;
  }
  return got_eacces ? EACCES : last;
}

int drv__spawn_have_pidfd(void) {
  int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
  if (fd >= 0) { close(fd); return 1; }
  return errno != ENOSYS && errno != EPERM && errno != EINVAL; /* EMFILE and such: it exists */
}

int drv__spawn(drv_engine *E, drv_spawner *sp, const drv_child *c, pid_t *pid, int *pidfd) {
  const char *path = NULL;
  char **e;
  uint64_t h, now;
  drv_path_entry *hit;
  if (sp->closed) return EBADF;
  if (sp->stack == NULL) {
    void *st = mmap(NULL, DRV_SPAWN_STACK, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (st == MAP_FAILED) return errno;
    sp->stack = st;
    drv__res_link(E, &sp->res, drv__spawner_close);
  }
  if (strchr(c->file, '/')) return drv__spawn_file(sp, c, c->file, pid, pidfd);
  if (strlen(c->file) > NAME_MAX) return ENAMETOOLONG;
  for (e = c->envp; *e; e++)
    if (strncmp(*e, "PATH=", 5) == 0) { path = *e + 5; break; }
  if (path == NULL) path = "/bin:/usr/bin"; /* glibc's execvp without PATH */
  h = drv__path_hash(c->file, path);
  now = drv__ms();
  hit = drv__path_find(sp, h, c->file, path);
  if (hit && now - hit->at < DRV_PATH_TTL_MS) {
    int r = drv__spawn_file(sp, c, hit->found, pid, pidfd);
    if (!drv__lookup_failed(r)) return r;
    free(hit->key); /* gone or changed since: search again */
    hit->key = NULL;
  }
  return drv__spawn_search(sp, c, path, h, now, pid, pidfd);
}
