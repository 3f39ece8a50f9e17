/*
 * proc.c -- drover.proc: child processes on the engine's loop, shaped like
 * Neovim's vim.system.
 *
 *   drover.proc.run(argv, opts)    -> result | nil, message
 *   drover.proc.spawn(argv, opts)  -> proc   | nil, message
 *   proc:wait([timeout]) proc:kill([sig]) proc:write(data) proc:close()
 *   proc:is_running() proc.pid
 *
 * A process is a drv_proc (malloc'ed, owned by C) plus a small Lua userdata
 * that points at it.  The C side outlives the userdata when it has to: a
 * process nobody holds a handle to still runs to the end, its pipes are
 * drained and its exit is reaped, and only then is the memory freed.  The
 * drv_proc is freed when its reference count -- one per open libuv handle
 * or entry in the engine's epoll set, plus one while the userdata lives --
 * drops to zero; the close callbacks touch nothing but the drv_proc, so
 * they may even run after the Lua state is gone (a host-owned loop).  An
 * entry of the set lets go of its reference when it is closed, at once, so
 * code that closes one and goes on using the drv_proc holds a reference of
 * its own meanwhile.
 *
 * A result is ready when the child has exited *and* every captured pipe has
 * reached end-of-file, so output written just before exit is never lost.
 * Waiters are woken with no values; the continuation builds the result
 * table on the waiting thread and caches it in the userdata, so the capture
 * buffers are turned into Lua strings once and then freed.
 *
 * Every child is started in a new session (setsid()): it leads its own
 * process group, and every kill drover sends goes to the whole group
 * (kill(-pid)).  That is what makes a timeout or a cancel stop
 * `sh -c 'a | b'` and the grandchildren it forked, not just the shell.
 * Stopping is two-phase: SIGTERM to the group, then SIGKILL after the grace
 * period; a further grace period later, pipes still held open by something
 * that escaped the group are closed so the waiter is never stranded.
 *
 * Starting a process is most of what an orchestrator does, so it is done
 * the cheap way: clone(CLONE_VM|CLONE_VFORK), as glibc's posix_spawn (what
 * make and the shells use) does, but on a stack kept for it and with the
 * pidfd from the clone itself (spawn.c), the exit watched through that
 * pidfd on the loop and reaped with waitpid.  libuv 1.44's uv_spawn fork()s
 * instead, which here costs several times as much CPU in drover's own
 * process (copying its page tables, then a copy-on-write fault on every
 * page it touches afterwards), and it watches exits through a SIGCHLD
 * handler that calls waitpid for every child it has.  The pidfd and the
 * captured output pipes are not libuv handles but entries of one epoll set
 * of the engine's (pset.c): one epoll_ctl each, where a handle apiece cost
 * five or six syscalls of probing and bookkeeping.  The child is set up
 * exactly as uv_spawn sets it up -- new session, every signal at its
 * default disposition and none blocked, stdio from pipes, files, /dev/null
 * or drover's own, the cwd, argv[1] looked up in the *child's* PATH like
 * execvp, a file without #! run by /bin/sh like execvp -- so nothing a
 * caller can see differs, except that captured streams are pipes where
 * libuv made socketpairs, and that a program found in PATH is remembered
 * for a second (spawn.c).  uv_spawn remains the fallback, chosen once per
 * engine when it starts: when the kernel has no pidfd_open (Linux < 5.3),
 * or when the environment says DROVER_SPAWN=uv (which keeps that path
 * tested).
 */
#include "drover_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define DRV_PROC_MT "drover.proc"
#define DRV_READ_CHUNK (64 * 1024)

enum { OUT_CAPTURE, OUT_INHERIT, OUT_NULL, OUT_FILE, OUT_FUNC };

typedef struct drv_proc drv_proc;

/* One output stream of the child (stdout or stderr). */
typedef struct {
  uv_pipe_t pipe;     /* uv_spawn: the pipe handle */
  drv_pent ent;       /* clone: the pipe's read end, in the engine's set */
  drv_proc *p;
  int mode;
  int piped;          /* output goes through a pipe (handle initialised, or fd made) */
  int reading;        /* pipe open and not yet at end-of-file */
  int fn_ref;         /* OUT_FUNC: the Lua function, in the registry */
  int fn_failed;      /* OUT_FUNC: it raised; later chunks are dropped */
  char *buf;          /* OUT_CAPTURE */
  size_t len, cap;
} drv_pout;

/* A thread waiting in proc:wait() or drover.proc.run(). */
typedef struct drv_pwaiter {
  drv_wait wait;      /* first: the cancel hook casts back */
  drv_proc *p;
  struct drv_pwaiter *next;
} drv_pwaiter;

/* One write to stdin; the bytes are copied so the Lua string may go away. */
typedef struct {
  uv_write_t req;
  drv_wait wait;
  drv_proc *p;
  int waited;         /* a thread waits in proc:write() */
  char data[];
} drv_pwrite;

/* Per-engine state, a userdata anchored in the registry. */
typedef struct {
  drv_engine *E;
  drv_pset *set;      /* clone: every child's pidfd and pipes; made at the first */
  drv_spawner spawner; /* clone: the child's stack, found programs */
  lua_State *cbL;     /* thread the output callbacks run on */
  int sigpipe_set;
  int sigchld_set;
  int uv_spawn;       /* start children with uv_spawn, not drv__spawn */
  char scratch[DRV_READ_CHUNK];
} drv_procs;

struct drv_proc {
  drv_res res;        /* engine resource: closing the engine reaches us */
  drv_procs *S;       /* NULL once the engine has closed */
  uv_loop_t *loop;
  drv_pset *set;      /* clone: the set pident and the pipes are in; NULL with uv_spawn */
  uv_process_t watch; /* uv_spawn */
  drv_pent pident;    /* clone: the pidfd, readable once the child exited */
  uv_pipe_t in;
  uv_timer_t timer;
  drv_pout out, err;
  drv_pwaiter *waiters;
  char *cb_error;     /* first error raised by an output callback */
  int refs;           /* open handles + 1 while the userdata lives */
  int pid;
  int proc_open;      /* the child is watched (watch handle or pidfd open) */
  int in_piped;       /* stdin is a pipe (opts.stdin = true or a string) */
  int in_open;        /* stdin pipe initialised and not closed */
  int in_close_pending; /* close stdin once the pending writes are done */
  int writes;         /* stdin writes in flight */
  int timer_init, timer_open;
  int exited, done, detach, closing;
  int term_sent, kill_sent, timed_out;
  int64_t exit_status;
  int term_signal;
  double grace;       /* seconds between SIGTERM and SIGKILL */
  uint64_t t0, t1;    /* uv_hrtime at spawn and at completion */
};

static const char drv__procs_key = 'P';

/* ---- lifetime ------------------------------------------------------------ */

static void drv__proc_unref(drv_proc *p) {
  if (--p->refs > 0) return;
  drv__res_unlink(&p->res);
  free(p->out.buf);
  free(p->err.buf);
  free(p->cb_error);
  free(p);
}

static void drv__proc_closed(uv_handle_t *h) { drv__proc_unref((drv_proc *)h->data); }

static void drv__proc_close(drv_proc *p, uv_handle_t *h) {
  h->data = p;
  uv_close(h, drv__proc_closed);
}

/* Take an entry out of the set and close its fd.  It held a reference, let
 * go here and now (not in a later close callback, as a handle's is): a
 * caller that goes on using p holds a reference of its own meanwhile. */
static void drv__proc_pent_close(drv_proc *p, drv_pent *e) {
  if (e->fd < 0) return;
  drv__pset_del(p->set, e);
  drv__proc_unref(p);
}

/* Stop reading an output stream (its pipe handle, or its fd in the set). */
static void drv__pout_close(drv_proc *p, drv_pout *o) {
  if (!o->reading) return;
  o->reading = 0;
  if (p->set) drv__proc_pent_close(p, &o->ent);
  else drv__proc_close(p, (uv_handle_t *)&o->pipe);
}

/* A detached child's handles must not keep the loop alive (drover.run, an
 * embedder's uv_run) -- except while somebody waits for it, or the loop
 * would think there is nothing left to wait for. */
static void drv__proc_apply_ref(drv_proc *p) {
  int on = !p->detach || p->waiters != NULL;
  uv_handle_t *hs[4];
  int i, n = 0;
  if (p->set) { /* (entries already out are skipped) */
    drv__pset_hold(p->set, &p->pident, on);
    drv__pset_hold(p->set, &p->out.ent, on);
    drv__pset_hold(p->set, &p->err.ent, on);
  } else {
    if (p->proc_open) hs[n++] = (uv_handle_t *)&p->watch;
    if (p->out.reading) hs[n++] = (uv_handle_t *)&p->out.pipe;
    if (p->err.reading) hs[n++] = (uv_handle_t *)&p->err.pipe;
  }
  if (p->timer_open) hs[n++] = (uv_handle_t *)&p->timer;
  for (i = 0; i < n; i++) {
    if (on) uv_ref(hs[i]); else uv_unref(hs[i]);
  }
}

/* Signal the child's whole process group.  The group id is the child's pid
 * (setsid); it stays reserved while any member lives, even after the
 * leader was reaped, so this reaches grandchildren the leader left behind. */
static int drv__proc_signal(drv_proc *p, int sig) {
  if (p->pid <= 0) return UV_ESRCH;
  if (kill(-p->pid, sig) == 0) return 0;
  return uv_translate_sys_error(errno);
}

static void drv__proc_close_stdin(drv_proc *p) {
  if (!p->in_open) return;
  p->in_open = 0;
  p->in_close_pending = 0;
  drv__proc_close(p, (uv_handle_t *)&p->in);
}

static void drv__proc_timer_close(drv_proc *p) {
  if (!p->timer_open) return;
  p->timer_open = 0;
  drv__proc_close(p, (uv_handle_t *)&p->timer);
}

static void drv__proc_timer_cb(uv_timer_t *t);

static void drv__proc_timer_start(drv_proc *p, double secs) {
  if (!p->timer_init) {
    uv_timer_init(p->loop, &p->timer);
    p->timer.data = p;
    p->timer_init = p->timer_open = 1;
    p->refs++;
    drv__proc_apply_ref(p);
  }
  if (!p->timer_open) return;
  if (!(secs < 1e12)) secs = 1e12; /* math.huge: "never", without overflowing */
  uv_timer_start(&p->timer, drv__proc_timer_cb, (uint64_t)(secs * 1000.0 + 0.5), 0);
}

/* ---- completion ----------------------------------------------------------- */

static void drv__proc_maybe_done(drv_proc *p) {
  drv_pwaiter *w;
  if (p->done || p->closing || !p->exited || p->out.reading || p->err.reading) return;
  p->done = 1;
  p->t1 = uv_hrtime();
  /* The leader is gone.  If we were stopping the group and stragglers may
   * remain (kill(-pgid, 0) succeeds), keep the timer: SIGKILL still comes
   * at the end of the grace period.  Otherwise the timer has no more use. */
  if (p->timer_open && !(p->term_sent && !p->kill_sent && drv__proc_signal(p, 0) == 0))
    drv__proc_timer_close(p);
  /* Nobody is left to read stdin (a grandchild holding it open must not
   * keep us alive): close it; writes still in flight fail with ECANCELED. */
  drv__proc_close_stdin(p);
  w = p->waiters;
  p->waiters = NULL;
  while (w) {
    drv_pwaiter *next = w->next;
    drv__wake(&w->wait, 0);
    free(w);
    w = next;
  }
}

/* Stop the group: SIGTERM now, SIGKILL after the grace period. */
static void drv__proc_terminate(drv_proc *p, int timed_out) {
  if (p->done || p->closing) return;
  if (timed_out) p->timed_out = 1;
  if (p->term_sent) return;
  p->term_sent = 1;
  drv__proc_signal(p, SIGTERM);
  drv__proc_timer_start(p, p->grace);
}

static void drv__pout_finish(drv_proc *p, drv_pout *o);

static void drv__proc_timer_cb(uv_timer_t *t) {
  drv_proc *p = (drv_proc *)t->data;
  if (!p->term_sent) { /* the timeout, or a wait's deadline */
    drv__proc_terminate(p, 1);
    return;
  }
  if (!p->kill_sent) {
    p->kill_sent = 1;
    drv__proc_signal(p, SIGKILL);
    if (p->done) { drv__proc_timer_close(p); return; }
    /* Give the pipes a moment to drain what the group wrote before dying. */
    drv__proc_timer_start(p, p->grace > 0.2 ? p->grace : 0.2);
    return;
  }
  if (!p->exited) { /* not even SIGKILL has taken effect yet: keep at it */
    drv__proc_signal(p, SIGKILL);
    drv__proc_timer_start(p, p->grace > 0.2 ? p->grace : 0.2);
    return;
  }
  /* The group is dead, yet a pipe is still open: whatever holds it escaped
   * the group (a daemon that called setsid).  Stop listening to it. */
  drv__pout_finish(p, &p->out);
  drv__pout_finish(p, &p->err);
  drv__proc_timer_close(p);
}

/* ---- output --------------------------------------------------------------- */

static drv_pout *drv__pout_of(drv_proc *p, uv_handle_t *h) {
  return h == (uv_handle_t *)&p->out.pipe ? &p->out : &p->err;
}

static void drv__pout_finish(drv_proc *p, drv_pout *o) {
  if (!o->reading) return;
  p->refs++; /* closing the fd may let go of the last reference */
  drv__pout_close(p, o);
  if (o->fn_ref != LUA_NOREF && p->S && !p->closing) {
    luaL_unref(p->S->cbL, LUA_REGISTRYINDEX, o->fn_ref);
    o->fn_ref = LUA_NOREF;
  }
  drv__proc_maybe_done(p);
  drv__proc_unref(p);
}

/* Reads land in the engine's scratch buffer, or straight into the capture
 * buffer once it has room: a child that prints nothing costs no malloc. */
static void drv__pout_buf(drv_proc *p, drv_pout *o, uv_buf_t *buf) {
  if (o->mode == OUT_CAPTURE && o->cap - o->len >= DRV_READ_CHUNK / 4) {
    buf->base = o->buf + o->len;
    buf->len = o->cap - o->len;
  } else {
    buf->base = p->S->scratch;
    buf->len = sizeof p->S->scratch;
  }
}

static void drv__pout_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  drv_proc *p = (drv_proc *)h->data;
  (void)suggested;
  drv__pout_buf(p, drv__pout_of(p, h), buf);
}

static int drv__pout_append(drv_pout *o, const char *data, size_t n) {
  if (o->cap - o->len < n) {
    size_t cap = o->cap ? o->cap : DRV_READ_CHUNK;
    char *b;
    while (cap - o->len < n + DRV_READ_CHUNK / 4) cap *= 2;
    b = (char *)realloc(o->buf, cap);
    if (b == NULL) return -1;
    o->buf = b;
    o->cap = cap;
  }
  memcpy(o->buf + o->len, data, n);
  o->len += n;
  return 0;
}

/* Runs under lua_pcall (below), so that building the chunk string cannot
 * raise an out-of-memory error through libuv either. */
static int drv__pout_trampoline(lua_State *C) {
  /* fn, data (light userdata), length, stream name (light userdata) */
  lua_pushvalue(C, 1);
  lua_pushlstring(C, (const char *)lua_touserdata(C, 2), (size_t)lua_tointeger(C, 3));
  lua_pushstring(C, (const char *)lua_touserdata(C, 4));
  lua_call(C, 2, 0);
  return 0;
}

/* Call the stream's Lua function with (chunk, "stdout"|"stderr").  It runs
 * on a thread of its own, inside the loop, under lua_pcall: it cannot wait
 * (drv__wait_init refuses, loop_depth > 0), and an error it raises becomes
 * the result's callback_error instead of unwinding through libuv.  After an
 * error the function is not called again; the rest of the output is read
 * and dropped so the child is not blocked on a full pipe. */
static void drv__pout_call(drv_proc *p, drv_pout *o, const char *data, size_t n) {
  drv_procs *S = p->S;
  lua_State *C = S->cbL;
  drv_engine *E = S->E;
  if (o->fn_failed) return;
  lua_settop(C, 0);
  lua_pushcfunction(C, drv__pout_trampoline);
  lua_rawgeti(C, LUA_REGISTRYINDEX, o->fn_ref);
  lua_pushlightuserdata(C, (void *)data);
  lua_pushinteger(C, (lua_Integer)n);
  lua_pushlightuserdata(C, (void *)(o == &p->out ? "stdout" : "stderr"));
  E->loop_depth++; /* even when a host runs the loop itself */
  if (lua_pcall(C, 4, 0, 0) != LUA_OK) {
    o->fn_failed = 1;
    if (p->cb_error == NULL) {
      const char *m = lua_tostring(C, -1);
      p->cb_error = strdup(m ? m : "(error object is not a string)");
    }
  }
  E->loop_depth--;
  lua_settop(C, 0);
}

/* n bytes read into buf (from drv__pout_buf). */
static void drv__pout_got(drv_proc *p, drv_pout *o, const uv_buf_t *buf, size_t n) {
  if (o->mode == OUT_FUNC) {
    drv__pout_call(p, o, buf->base, n);
  } else if (o->buf != NULL && buf->base == o->buf + o->len) {
    o->len += n;
  } else if (drv__pout_append(o, buf->base, n) != 0 && p->cb_error == NULL) {
    p->cb_error = strdup("drover.proc: out of memory capturing output");
  }
}

static void drv__pout_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  drv_proc *p = (drv_proc *)s->data;
  drv_pout *o = drv__pout_of(p, (uv_handle_t *)s);
  if (n > 0) drv__pout_got(p, o, buf, (size_t)n);
  else if (n < 0) drv__pout_finish(p, o); /* UV_EOF, or a read error: either way the stream is over */
}

/* The pipe's fd in the set is readable (or the writers are gone).  Read as
 * libuv would: until a read comes back short (the pipe is empty; what
 * comes later is reported again), at most 32 times per turn. */
static void drv__pout_ready(drv_pent *e) {
  drv_pout *o = (drv_pout *)((char *)e - offsetof(drv_pout, ent));
  drv_proc *p = o->p;
  int i;
  p->refs++;
  for (i = 0; i < 32 && o->reading; i++) {
    uv_buf_t buf;
    ssize_t n;
    drv__pout_buf(p, o, &buf);
    n = read(e->fd, buf.base, buf.len);
    if (n > 0) {
      drv__pout_got(p, o, &buf, (size_t)n);
      if ((size_t)n < buf.len) break;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      drv__pout_finish(p, o); /* end-of-file, or a read error: the stream is over */
    }
  }
  drv__proc_unref(p);
}

/* Stop watching the child: close the watch handle, or the pidfd (which
 * lets go of its reference at once: callers that go on hold one). */
static void drv__proc_unwatch(drv_proc *p) {
  if (!p->proc_open) return;
  p->proc_open = 0;
  if (p->set) drv__proc_pent_close(p, &p->pident);
  else drv__proc_close(p, (uv_handle_t *)&p->watch);
}

static void drv__proc_exited(drv_proc *p, int64_t status, int sig) {
  p->exited = 1;
  p->exit_status = status;
  p->term_signal = sig;
  drv__proc_unwatch(p);
  drv__proc_maybe_done(p);
}

static void drv__proc_exit_cb(uv_process_t *h, int64_t status, int sig) {
  drv__proc_exited((drv_proc *)h->data, status, sig);
}

/* The pidfd is readable: the child has exited (it is a zombie until we
 * reap it, so its pid cannot have been reused).  Reap it and report the
 * status the way libuv does. */
static void drv__proc_pidfd_ready(drv_pent *e) {
  drv_proc *p = (drv_proc *)((char *)e - offsetof(drv_proc, pident));
  int st = 0;
  pid_t r;
  do r = waitpid(p->pid, &st, WNOHANG);
  while (r < 0 && errno == EINTR);
  if (r == 0) return; /* not reapable after all: the set reports it again */
  p->refs++;
  /* ECHILD: something else in the process reaped it (a waitpid(-1) of the
   * host's).  The status is lost; finish rather than hang. */
  if (r < 0) drv__proc_exited(p, -1, 0);
  else drv__proc_exited(p, WIFEXITED(st) ? WEXITSTATUS(st) : 0, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  drv__proc_unref(p);
}

/* ---- stdin ------------------------------------------------------------------ */

static void drv__proc_written(uv_write_t *req, int status) {
  drv_pwrite *w = (drv_pwrite *)req;
  drv_proc *p = w->p;
  p->writes--;
  if (w->waited && !p->closing) {
    lua_State *L = drv__wait_stack(&w->wait);
    if (status == 0) {
      lua_pushboolean(L, 1);
      drv__wake(&w->wait, 1);
    } else {
      lua_pushnil(L);
      lua_pushstring(L, uv_strerror(status));
      drv__wake(&w->wait, 2);
    }
  }
  free(w);
  if (p->writes == 0 && p->in_close_pending) drv__proc_close_stdin(p);
}

/* Queue data on stdin.  Returns 0 when it was written at once (uv_try_write),
 * 1 when a write is in flight (*out set), or a negative libuv error. */
static int drv__proc_send(drv_proc *p, const char *data, size_t len, drv_pwrite **out) {
  drv_pwrite *w;
  uv_buf_t b;
  int r;
  *out = NULL;
  if (len == 0) return 0;
  if (p->writes == 0) {
    b = uv_buf_init((char *)data, (unsigned)len);
    r = uv_try_write((uv_stream_t *)&p->in, &b, 1);
    if (r == (int)len) return 0;
    if (r < 0 && r != UV_EAGAIN) return r;
    if (r > 0) { data += r; len -= (size_t)r; }
  }
  w = (drv_pwrite *)malloc(sizeof *w + len);
  if (w == NULL) return UV_ENOMEM;
  memset(w, 0, sizeof *w);
  memcpy(w->data, data, len);
  w->p = p;
  b = uv_buf_init(w->data, (unsigned)len);
  r = uv_write(&w->req, (uv_stream_t *)&p->in, &b, 1, drv__proc_written);
  if (r < 0) { free(w); return r; }
  p->writes++;
  *out = w;
  return 1;
}

/* ---- engine shutdown ------------------------------------------------------------ */

/* The engine is closing (lua_close): nobody is left to wait for results.
 * Kill what is still running unless it was detached, reap it so it does not
 * linger as a zombie of an embedding host, and close every handle. */
static void drv__proc_res_close(drv_res *r) {
  drv_proc *p = (drv_proc *)r;
  drv_pwaiter *w;
  int reap = 0;
  drv__res_unlink(r);
  p->refs++; /* closing the set's fds lets go of their references at once */
  p->closing = 1;
  p->S = NULL;
  if (!p->detach && p->pid > 0) {
    /* No grace period: the engine is going away now.  Sent even if the
     * leader exited, so that grandchildren left in the group die too. */
    drv__proc_signal(p, SIGKILL);
    reap = !p->exited;
  }
  drv__proc_unwatch(p);
  drv__pout_close(p, &p->out);
  drv__pout_close(p, &p->err);
  drv__proc_close_stdin(p);
  drv__proc_timer_close(p);
  for (w = p->waiters; w;) { /* their threads are being collected: no wake */
    drv_pwaiter *next = w->next;
    free(w);
    w = next;
  }
  p->waiters = NULL;
  if (reap) {
    /* Nothing watches this pid any more (its handle is closed).  SIGKILL is
     * quick, but bound the wait in case the child sits in the kernel. */
    int i, st;
    for (i = 0; i < 2000; i++) {
      struct timespec ts = {0, 1000000};
      pid_t r2 = waitpid(p->pid, &st, WNOHANG);
      if (r2 == p->pid || (r2 < 0 && errno != EINTR)) break;
      nanosleep(&ts, NULL);
    }
  }
  drv__proc_unref(p);
}

/* ---- argument parsing ----------------------------------------------------------- */

typedef struct {
  const char *fname;
  const char *cwd;
  int env_idx;         /* 0: inherit the environment unchanged */
  int clear_env;
  int stdin_mode;      /* 0: /dev/null, 1: the string, 2: a pipe for :write */
  const char *stdin_data;
  size_t stdin_len;
  int out_mode, err_mode;
  const char *out_path, *err_path;
  int out_fn, err_fn;  /* stack index of the function */
  double timeout;      /* <= 0: none */
  double grace;
  int detach;
} drv_popts;

static const char *const drv__opt_keys[] = {"cwd",    "env",     "clear_env", "stdin",
                                            "stdout", "stderr",  "timeout",   "kill_grace",
                                            "detach", NULL};

static void drv__parse_out(lua_State *L, int opts, drv_popts *o, const char *key, int *mode,
                           const char **path, int *fn) {
  int t;
  *mode = o->detach ? OUT_NULL : OUT_CAPTURE;
  *path = NULL;
  *fn = 0;
  if (opts == 0) return;
  lua_getfield(L, opts, key);
  t = lua_type(L, -1);
  if (t == LUA_TNIL) { lua_pop(L, 1); return; }
  if (t == LUA_TFUNCTION) {
    *mode = OUT_FUNC;
    *fn = lua_gettop(L); /* stays on the stack until the spawn is done */
    return;
  }
  if (t == LUA_TSTRING) {
    const char *s = lua_tostring(L, -1);
    if (strcmp(s, "capture") == 0) *mode = OUT_CAPTURE;
    else if (strcmp(s, "inherit") == 0) *mode = OUT_INHERIT;
    else if (strcmp(s, "null") == 0) *mode = OUT_NULL;
    else if (*s == '\0') luaL_error(L, "%s: bad option '%s' (empty file path)", o->fname, key);
    else { *mode = OUT_FILE; *path = s; }
    lua_pop(L, 1); /* anchored in the options table */
    return;
  }
  luaL_error(L, "%s: bad option '%s' (\"capture\", \"inherit\", \"null\", a file path or a "
                "function expected, got %s)", o->fname, key, luaL_typename(L, -1));
}

static void drv__parse_opts(lua_State *L, int opts, drv_popts *o, int for_run) {
  const char *fn = o->fname;
  if (opts != 0) {
    lua_pushnil(L);
    while (lua_next(L, opts) != 0) {
      int i, known = 0;
      if (lua_type(L, -2) == LUA_TSTRING) {
        const char *k = lua_tostring(L, -2);
        for (i = 0; drv__opt_keys[i]; i++)
          if (strcmp(k, drv__opt_keys[i]) == 0) { known = 1; break; }
        if (!known) luaL_error(L, "%s: unknown option '%s'", fn, k);
      } else {
        luaL_error(L, "%s: bad argument 'opts' (option names must be strings, got %s)", fn,
                   luaL_typename(L, -2));
      }
      lua_pop(L, 1);
    }
  }
  /* index 2 holds the options table, or nil */
  o->cwd = drv__opt_string(L, 2, fn, "cwd", NULL);
  o->clear_env = drv__opt_bool(L, 2, fn, "clear_env", 0);
  o->detach = drv__opt_bool(L, 2, fn, "detach", 0);
  o->timeout = drv__opt_number(L, 2, fn, "timeout", 0);
  o->grace = drv__opt_number(L, 2, fn, "kill_grace", 2);
  if (opts != 0) {
    lua_getfield(L, opts, "timeout");
    if (!lua_isnil(L, -1) && !(o->timeout > 0))
      luaL_error(L, "%s: bad option 'timeout' (must be > 0)", fn);
    lua_pop(L, 1);
  }
  if (!(o->grace >= 0) || o->grace > 1e9) luaL_error(L, "%s: bad option 'kill_grace' (must be >= 0)", fn);
  if (o->cwd && *o->cwd == '\0') luaL_error(L, "%s: bad option 'cwd' (empty path)", fn);
  if (opts != 0) {
    int t;
    lua_getfield(L, opts, "env");
    t = lua_type(L, -1);
    if (t == LUA_TTABLE) o->env_idx = lua_gettop(L); /* stays on the stack */
    else if (t != LUA_TNIL) luaL_error(L, "%s: bad option 'env' (table expected, got %s)", fn, luaL_typename(L, -1));
    else lua_pop(L, 1);
    lua_getfield(L, opts, "stdin");
    t = lua_type(L, -1);
    if (t == LUA_TSTRING) {
      o->stdin_mode = 1;
      o->stdin_data = lua_tolstring(L, -1, &o->stdin_len);
    } else if (t == LUA_TBOOLEAN) {
      o->stdin_mode = lua_toboolean(L, -1) ? 2 : 0;
      if (o->stdin_mode == 2 && for_run)
        luaL_error(L, "%s: bad option 'stdin' (true needs drover.proc.spawn and proc:write; "
                      "pass the input as a string)", fn);
    } else if (t != LUA_TNIL) {
      luaL_error(L, "%s: bad option 'stdin' (string or boolean expected, got %s)", fn, luaL_typename(L, -1));
    }
    lua_pop(L, 1); /* a string stays anchored in the options table */
  }
  drv__parse_out(L, opts, o, "stdout", &o->out_mode, &o->out_path, &o->out_fn);
  drv__parse_out(L, opts, o, "stderr", &o->err_mode, &o->err_path, &o->err_fn);
}

/* argv table -> NULL-terminated char *[] in a userdata pushed on the stack.
 * Strings point into the table (which the caller keeps on the stack);
 * numbers are converted and the converted strings kept on the stack too. */
static char **drv__build_argv(lua_State *L, const char *fname) {
  lua_Integer n = luaL_len(L, 1), i;
  char **args;
  if (n < 1) luaL_error(L, "%s: bad argument 'argv' (program name expected in argv[1])", fname);
  if (n > 1000000) luaL_error(L, "%s: bad argument 'argv' (too many arguments)", fname);
  args = (char **)lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 0);
  for (i = 1; i <= n; i++) {
    size_t len;
    const char *s;
    int t = lua_rawgeti(L, 1, i);
    if (t == LUA_TSTRING) {
      s = lua_tolstring(L, -1, &len);
      lua_pop(L, 1); /* anchored in argv */
    } else if (t == LUA_TNUMBER) {
      luaL_checkstack(L, 4, "drover.proc: too many arguments");
      s = lua_tolstring(L, -1, &len); /* kept on the stack */
    } else {
      luaL_error(L, "%s: bad argument 'argv[%d]' (string expected, got %s)", fname, (int)i,
                 luaL_typename(L, -1));
      return NULL; /* not reached */
    }
    if (strlen(s) != len)
      luaL_error(L, "%s: bad argument 'argv[%d]' (contains a NUL byte)", fname, (int)i);
    args[i - 1] = (char *)s;
  }
  args[n] = NULL;
  if (*args[0] == '\0') luaL_error(L, "%s: bad argument 'argv' (argv[1] is empty)", fname);
  return args;
}

/* The child's environment: the parent's, minus names the env table sets or
 * removes (value false), plus the env table's NAME=value strings; or only
 * the table's entries with clear_env.  Built only when env/clear_env is
 * given -- otherwise libuv passes our environ through untouched. */
static char **drv__build_env(lua_State *L, const drv_popts *o) {
  size_t nparent = 0, nset = 0, bytes = 0, k = 0;
  char **envp, *q, **e;
  int idx = o->env_idx;
  if (idx) {
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
      size_t kl, vl;
      const char *key;
      int vt = lua_type(L, -1);
      if (lua_type(L, -2) != LUA_TSTRING)
        luaL_error(L, "%s: bad option 'env' (names must be strings, got %s)", o->fname, luaL_typename(L, -2));
      key = lua_tolstring(L, -2, &kl);
      if (kl == 0 || strlen(key) != kl || strchr(key, '=') != NULL)
        luaL_error(L, "%s: bad option 'env' (invalid variable name '%s')", o->fname, key);
      if (vt == LUA_TSTRING || vt == LUA_TNUMBER) {
        const char *v;
        lua_pushvalue(L, -1);
        v = lua_tolstring(L, -1, &vl);
        if (strlen(v) != vl)
          luaL_error(L, "%s: bad option 'env' (value of '%s' contains a NUL byte)", o->fname, key);
        lua_pop(L, 1);
        nset++;
        bytes += kl + vl + 2;
      } else if (!(vt == LUA_TBOOLEAN && !lua_toboolean(L, -1))) {
        luaL_error(L, "%s: bad option 'env' (value of '%s': string, number or false expected, got %s)",
                   o->fname, key, luaL_typename(L, -1));
      }
      lua_pop(L, 1);
    }
  }
  if (!o->clear_env)
    for (e = environ; *e; e++) nparent++;
  envp = (char **)lua_newuserdatauv(L, sizeof(char *) * (nparent + nset + 1) + bytes, 0);
  q = (char *)(envp + nparent + nset + 1);
  if (!o->clear_env) {
    for (e = environ; *e; e++) {
      const char *eq = strchr(*e, '=');
      if (idx && eq) {
        int overridden;
        lua_pushlstring(L, *e, (size_t)(eq - *e));
        overridden = lua_rawget(L, idx) != LUA_TNIL;
        lua_pop(L, 1);
        if (overridden) continue;
      }
      envp[k++] = *e;
    }
  }
  if (idx) {
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
      if (lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER) {
        size_t kl, vl;
        const char *key = lua_tolstring(L, -2, &kl), *v;
        lua_pushvalue(L, -1);
        v = lua_tolstring(L, -1, &vl);
        envp[k++] = q;
        memcpy(q, key, kl);
        q[kl] = '=';
        memcpy(q + kl + 1, v, vl);
        q[kl + 1 + vl] = '\0';
        q += kl + vl + 2;
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
  }
  envp[k] = NULL;
  return envp;
}

/* ---- spawning ----------------------------------------------------------------- */

static drv_procs *drv__procs(lua_State *L) {
  drv_procs *S;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__procs_key);
  S = (drv_procs *)lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (S == NULL) luaL_error(L, "drover.proc: not initialised (require 'drover.core' first)");
  return S;
}

static int drv__open_outfile(const char *path) {
  return open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY, 0666);
}

/* ---- spawning with uv_spawn (the fallback) ---- */

static void drv__stdio_out(uv_stdio_container_t *c, drv_pout *o, int fd, int own_fd) {
  switch (o->mode) {
  case OUT_CAPTURE:
  case OUT_FUNC:
    c->flags = (uv_stdio_flags)(UV_CREATE_PIPE | UV_WRITABLE_PIPE);
    c->data.stream = (uv_stream_t *)&o->pipe;
    break;
  case OUT_INHERIT: c->flags = UV_INHERIT_FD; c->data.fd = own_fd; break;
  case OUT_FILE: c->flags = UV_INHERIT_FD; c->data.fd = fd; break;
  default: c->flags = UV_IGNORE; break; /* libuv opens /dev/null in the child */
  }
}

/* Returns 0 or a libuv error. */
static int drv__spawn_uv(drv_proc *p, const drv_popts *o, char **args, char **envp, int out_fd,
                         int err_fd) {
  uv_process_options_t uo;
  uv_stdio_container_t stdio[3];
  int r;
  memset(stdio, 0, sizeof stdio);
  if (p->in_piped) {
    stdio[0].flags = (uv_stdio_flags)(UV_CREATE_PIPE | UV_READABLE_PIPE);
    stdio[0].data.stream = (uv_stream_t *)&p->in;
  } else {
    stdio[0].flags = UV_IGNORE;
  }
  drv__stdio_out(&stdio[1], &p->out, out_fd, 1);
  drv__stdio_out(&stdio[2], &p->err, err_fd, 2);
  memset(&uo, 0, sizeof uo);
  uo.exit_cb = drv__proc_exit_cb;
  uo.file = args[0];
  uo.args = args;
  uo.env = envp;
  uo.cwd = o->cwd;
  uo.flags = UV_PROCESS_DETACHED; /* setsid: a process group of its own */
  uo.stdio_count = 3;
  uo.stdio = stdio;
  p->watch.data = p;
  r = uv_spawn(p->loop, &p->watch, &uo);
  p->refs++; /* the process handle is initialised even when uv_spawn fails */
  p->proc_open = 1;
  if (r != 0 && p->watch.pid > 0) {
    /* exec happened but libuv failed to open a pipe: do not leave the
     * child running unobserved. */
    kill(-p->watch.pid, SIGKILL);
    while (waitpid(p->watch.pid, NULL, 0) < 0 && errno == EINTR) {}
  }
  if (r == 0) p->pid = p->watch.pid;
  return r;
}

/* ---- spawning with drv__spawn (clone) + pidfd ---- */

/* A descriptor the child is to receive as its 0, 1 or 2 must not itself be
 * 0, 1 or 2 (possible when drover runs with its own stdio closed): the
 * file action that sets up a lower fd would replace it before it is used.
 * libuv moves such fds out of the way in the child; we do it here. */
static int drv__above_stdio(int fd) {
  int nfd;
  if (fd < 0 || fd > 2) return fd;
  nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  close(fd);
  return nfd;
}

/* A pipe whose both ends are close-on-exec, so no other child inherits
 * them; file actions dup the child's end onto 0, 1 or 2, which clears the
 * flag on that copy only.  child_reads: fds[0] is the child's end.
 * nonblock: make drover's end non-blocking (the child's stays blocking).
 * Returns 0 or a libuv error. */
static int drv__pipe(int fds[2], int child_reads, int nonblock) {
  int c = child_reads ? 0 : 1, e;
  if (pipe2(fds, O_CLOEXEC) != 0) return uv_translate_sys_error(errno);
  if ((fds[c] = drv__above_stdio(fds[c])) < 0) {
    e = errno;
    close(fds[1 - c]);
    return uv_translate_sys_error(e);
  }
  if (nonblock && fcntl(fds[1 - c], F_SETFL, O_NONBLOCK) != 0) {
    e = errno;
    close(fds[0]);
    close(fds[1]);
    return uv_translate_sys_error(e);
  }
  return 0;
}

/* What the child's fd (1 or 2) is to be, for drv_child.fd. */
static int drv__child_out(int fd, int mode, int pipe_fd, int file_fd) {
  int fl;
  switch (mode) {
  case OUT_CAPTURE:
  case OUT_FUNC: return pipe_fd;
  case OUT_FILE: return file_fd;
  case OUT_INHERIT:
    /* As libuv: a closed fd stays closed in the child, and the child gets
     * it in blocking mode (shared with drover: the file description is). */
    if ((fl = fcntl(fd, F_GETFL)) < 0) return DRV_CHILD_KEEP;
    if (fl & O_NONBLOCK) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    return fd;
  default: return DRV_CHILD_NULL;
  }
}

/* Returns 0 or a libuv error.  On success the child runs, its pidfd and
 * output pipes in the engine's set (each entry holding a reference); on
 * failure there is no child and nothing of it is open. */
static int drv__spawn_clone(drv_proc *p, const drv_popts *o, char **args, char **envp, int out_fd,
                            int err_fd) {
  drv_child c;
  int child[3] = {-1, -1, -1}; /* the child's ends of the pipes */
  int ours[3] = {-1, -1, -1};  /* drover's ends of the output pipes (1, 2), until in the set */
  int fds[2], r = 0, e, i, pidfd;
  pid_t pid = -1;
  drv_pset *set = p->S->set;

  if (!p->S->sigchld_set) {
    /* SIGCHLD ignored (or SA_NOCLDWAIT) would have the kernel reap our
     * children before we read their status.  uv_spawn overrides that with
     * a handler of its own; the default disposition is enough for us. */
    struct sigaction sa;
    p->S->sigchld_set = 1;
    if (sigaction(SIGCHLD, NULL, &sa) == 0 &&
        (sa.sa_handler == SIG_IGN || (sa.sa_flags & SA_NOCLDWAIT)))
      signal(SIGCHLD, SIG_DFL);
  }
  if (set == NULL && (set = p->S->set = drv__pset_new(p->S->E)) == NULL) return UV_ENOMEM;
  /* Pipes: stdin's drover end becomes a uv_pipe_t handle (uv_pipe_open
   * makes it non-blocking), the output pipes' go into the set once the
   * child runs; the child's ends stay blocking. */
  if (p->in_piped) {
    if ((r = drv__pipe(fds, 1, 0)) < 0) goto done;
    child[0] = fds[0];
    if ((r = uv_pipe_open(&p->in, fds[1])) < 0) { close(fds[1]); goto done; }
  }
  if (p->out.piped) {
    if ((r = drv__pipe(fds, 0, 1)) < 0) goto done;
    child[1] = fds[1];
    ours[1] = fds[0];
  }
  if (p->err.piped) {
    if ((r = drv__pipe(fds, 0, 1)) < 0) goto done;
    child[2] = fds[1];
    ours[2] = fds[0];
  }
  c.file = args[0];
  c.argv = args;
  c.envp = envp ? envp : environ;
  c.cwd = o->cwd;
  c.fd[0] = child[0] >= 0 ? child[0] : DRV_CHILD_NULL;
  c.fd[1] = drv__child_out(1, p->out.mode, child[1], out_fd);
  c.fd[2] = drv__child_out(2, p->err.mode, child[2], err_fd);
  if ((e = drv__spawn(p->S->E, &p->S->spawner, &c, &pid, &pidfd)) != 0) {
    r = uv_translate_sys_error(e);
    goto done;
  }

  if ((r = drv__pset_add(set, &p->pident, pidfd, drv__proc_pidfd_ready)) < 0) {
    close(pidfd);
  } else {
    p->set = set;
    p->proc_open = 1;
    p->refs++;
    p->pid = pid;
    for (i = 1; i <= 2 && r == 0; i++) {
      drv_pout *po = i == 1 ? &p->out : &p->err;
      if (ours[i] < 0) continue;
      if ((r = drv__pset_add(set, &po->ent, ours[i], drv__pout_ready)) == 0) {
        ours[i] = -1;
        p->refs++;
      }
    }
  }
  if (r < 0) { /* cannot watch it: do not leave it running unobserved */
    kill(-pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    p->pid = 0;
    p->refs++; /* closing the entries lets go of their references */
    drv__proc_unwatch(p);
    drv__proc_pent_close(p, &p->out.ent);
    drv__proc_pent_close(p, &p->err.ent);
    p->refs--; /* drv__proc_start frees it, on its way out */
  }
done:
  for (i = 0; i < 3; i++) {
    if (child[i] >= 0) close(child[i]);
    if (ours[i] >= 0) close(ours[i]);
  }
  return r;
}

/* ---- starting a process ---- */

/* Push the userdata of a new process, or nil + message if it could not be
 * started.  Arguments: argv at 1, opts at 2.  Returns the count pushed. */
static int drv__proc_start(lua_State *L, const char *fname, int for_run) {
  drv_procs *S = drv__procs(L);
  drv_popts o;
  char **args, **envp = NULL;
  int opts = 0, out_fd = -1, err_fd = -1, r;
  drv_proc *p, **box;
  const char *what = NULL, *path = NULL;
  int ud;

  memset(&o, 0, sizeof o);
  o.fname = fname;
  if (lua_type(L, 1) != LUA_TTABLE) return drv__argerror(L, fname, "argv", "table", 1);
  if (!lua_isnoneornil(L, 2)) {
    if (lua_type(L, 2) != LUA_TTABLE) return drv__argerror(L, fname, "opts", "table", 2);
    opts = 2;
  }
  lua_settop(L, 2);
  drv__parse_opts(L, opts, &o, for_run);
  args = drv__build_argv(L, fname);
  if (o.env_idx || o.clear_env) envp = drv__build_env(L, &o);

  /* Everything below either succeeds or returns nil, message: no raising
   * once resources exist (except out-of-memory in the userdata itself,
   * which happens before any of them). */
  box = (drv_proc **)lua_newuserdatauv(L, sizeof *box, 1);
  *box = NULL;
  luaL_setmetatable(L, DRV_PROC_MT);
  ud = lua_gettop(L);

  if (o.out_mode == OUT_FILE && (out_fd = drv__above_stdio(drv__open_outfile(o.out_path))) < 0) {
    what = "stdout";
    path = o.out_path;
  } else if (o.err_mode == OUT_FILE && (err_fd = drv__above_stdio(drv__open_outfile(o.err_path))) < 0) {
    what = "stderr";
    path = o.err_path;
  }
  if (what) {
    int e = errno;
    if (out_fd >= 0) close(out_fd);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: cannot open %s file '%s': %s", fname, what, path,
                    uv_strerror(uv_translate_sys_error(e)));
    return 2;
  }

  p = (drv_proc *)calloc(1, sizeof *p);
  if (p == NULL) {
    if (out_fd >= 0) close(out_fd);
    if (err_fd >= 0) close(err_fd);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: out of memory", fname);
    return 2;
  }
  p->S = S;
  p->loop = S->E->loop;
  p->detach = o.detach;
  p->grace = o.grace;
  p->pident.fd = p->out.ent.fd = p->err.ent.fd = -1;
  p->out.p = p->err.p = p;
  p->out.mode = o.out_mode;
  p->err.mode = o.err_mode;
  p->out.fn_ref = p->err.fn_ref = LUA_NOREF;

  if (o.stdin_mode) {
    uv_pipe_init(p->loop, &p->in, 0);
    p->in.data = p;
    p->in_open = p->in_piped = 1;
    p->refs++;
    if (!S->sigpipe_set) {
      /* A child that exits without reading its stdin makes our write fail;
       * that must be EPIPE, not a SIGPIPE that kills drover.  The child
       * gets the default disposition back before exec. */
      struct sigaction sa;
      S->sigpipe_set = 1;
      if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
    }
  }
  /* Output pipes: uv_spawn makes them into handles it is given; the clone
   * path puts fds into the set (drv__spawn_clone). */
  p->out.piped = o.out_mode == OUT_CAPTURE || o.out_mode == OUT_FUNC;
  p->err.piped = o.err_mode == OUT_CAPTURE || o.err_mode == OUT_FUNC;
  if (S->uv_spawn && p->out.piped) {
    uv_pipe_init(p->loop, &p->out.pipe, 0); p->out.pipe.data = p; p->refs++;
  }
  if (S->uv_spawn && p->err.piped) {
    uv_pipe_init(p->loop, &p->err.pipe, 0); p->err.pipe.data = p; p->refs++;
  }

  p->t0 = uv_hrtime();
  if (S->uv_spawn) r = drv__spawn_uv(p, &o, args, envp, out_fd, err_fd);
  else r = drv__spawn_clone(p, &o, args, envp, out_fd, err_fd);
  if (out_fd >= 0) close(out_fd); /* the child has its own copy now */
  if (err_fd >= 0) close(err_fd);

  if (r != 0) {
    char msg[512];
    struct stat st;
    if (o.cwd && (stat(o.cwd, &st) != 0 || !S_ISDIR(st.st_mode)))
      snprintf(msg, sizeof msg, "cwd '%s': %s", o.cwd,
               uv_strerror(stat(o.cwd, &st) != 0 ? uv_translate_sys_error(errno) : UV_ENOTDIR));
    else
      snprintf(msg, sizeof msg, "%s", uv_strerror(r));
    p->refs++; /* until the last of its handles is closed: then it is freed */
    drv__proc_unwatch(p);
    if (S->uv_spawn && p->out.piped) drv__proc_close(p, (uv_handle_t *)&p->out.pipe);
    if (S->uv_spawn && p->err.piped) drv__proc_close(p, (uv_handle_t *)&p->err.pipe);
    drv__proc_close_stdin(p);
    drv__proc_unref(p);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: cannot start '%s': %s", fname, args[0], msg);
    return 2;
  }

  p->refs++; /* the userdata */
  *box = p;
  drv__res_link(S->E, &p->res, drv__proc_res_close);
  p->out.reading = p->out.piped;
  p->err.reading = p->err.piped;
  if (!p->set && p->out.piped) uv_read_start((uv_stream_t *)&p->out.pipe, drv__pout_alloc, drv__pout_read);
  if (!p->set && p->err.piped) uv_read_start((uv_stream_t *)&p->err.pipe, drv__pout_alloc, drv__pout_read);
  if (o.out_fn) { lua_pushvalue(L, o.out_fn); p->out.fn_ref = luaL_ref(L, LUA_REGISTRYINDEX); }
  if (o.err_fn) { lua_pushvalue(L, o.err_fn); p->err.fn_ref = luaL_ref(L, LUA_REGISTRYINDEX); }
  if (o.timeout > 0) drv__proc_timer_start(p, o.timeout);
  drv__proc_apply_ref(p);
  if (o.stdin_mode == 1) {
    drv_pwrite *w;
    if (drv__proc_send(p, o.stdin_data, o.stdin_len, &w) == 1) p->in_close_pending = 1;
    else drv__proc_close_stdin(p);
  }
  lua_pushvalue(L, ud);
  return 1;
}

/* ---- results ---------------------------------------------------------------------- */

static drv_proc *drv__check_proc(lua_State *L, int idx, const char *fname) {
  drv_proc **box = (drv_proc **)luaL_testudata(L, idx, DRV_PROC_MT);
  if (box == NULL) drv__argerror(L, fname, "self", "process", idx);
  if (*box == NULL) luaL_error(L, "%s: the process was never started", fname);
  return *box;
}

static void drv__setfield_out(lua_State *L, const char *k, drv_pout *o) {
  if (o->mode != OUT_CAPTURE) return;
  lua_pushlstring(L, o->buf ? o->buf : "", o->len);
  lua_setfield(L, -2, k);
  free(o->buf);
  o->buf = NULL;
  o->len = o->cap = 0;
}

/* The result table of the finished process whose userdata is at idx;
 * built once, then cached in the userdata's user value. */
static int drv__proc_result(lua_State *L, int idx) {
  drv_proc *p = drv__check_proc(L, idx, "proc:wait");
  if (lua_getiuservalue(L, idx, 1) == LUA_TTABLE) return 1;
  lua_pop(L, 1);
  lua_createtable(L, 0, 8);
  if (p->timed_out) lua_pushinteger(L, 124);
  else if (p->term_signal) lua_pushinteger(L, 128 + p->term_signal);
  else lua_pushinteger(L, (lua_Integer)p->exit_status);
  lua_setfield(L, -2, "code");
  lua_pushinteger(L, p->term_signal);
  lua_setfield(L, -2, "signal");
  lua_pushboolean(L, p->timed_out);
  lua_setfield(L, -2, "timed_out");
  lua_pushnumber(L, (double)(p->t1 - p->t0) / 1e9);
  lua_setfield(L, -2, "duration");
  lua_pushinteger(L, p->pid);
  lua_setfield(L, -2, "pid");
  drv__setfield_out(L, "stdout", &p->out);
  drv__setfield_out(L, "stderr", &p->err);
  if (p->cb_error) {
    lua_pushstring(L, p->cb_error);
    lua_setfield(L, -2, "callback_error");
  }
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, idx, 1);
  return 1;
}

static int drv__proc_wait_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  return drv__proc_result(L, 1);
}

/* The task waiting on the process was cancelled: stop the whole group.  The
 * waiter is woken by completion, i.e. once the child has really exited. */
static void drv__proc_wait_cancel(drv_wait *w) {
  drv__proc_terminate(((drv_pwaiter *)w)->p, 0);
}

/* Wait for the process whose userdata is at index 1 (the only value on the
 * stack); tmp comes from drv__wait_init, done before anything started. */
static int drv__proc_await(lua_State *L, drv_proc *p, drv_wait *tmp, const char *fname) {
  drv_pwaiter *w;
  if (p->done) return drv__proc_result(L, 1);
  w = (drv_pwaiter *)malloc(sizeof *w);
  if (w == NULL) {
    drv__proc_terminate(p, 0);
    return luaL_error(L, "%s: out of memory", fname);
  }
  w->wait = *tmp;
  w->wait.cancel = drv__proc_wait_cancel;
  w->p = p;
  w->next = p->waiters;
  p->waiters = w;
  if (p->detach) drv__proc_apply_ref(p);
  return drv__awaitk(L, &w->wait, drv__proc_wait_k, 0);
}

/* ---- Lua API ------------------------------------------------------------------------ */

/* drover.proc.run(argv [, opts]) -> result | nil, message */
static int drv__l_run(lua_State *L) {
  drv_wait tmp;
  int n;
  drv__wait_init(&tmp, L); /* may raise: before the process exists */
  n = drv__proc_start(L, "drover.proc.run", 1);
  if (n != 1) return n;
  lua_replace(L, 1);
  lua_settop(L, 1);
  return drv__proc_await(L, *(drv_proc **)lua_touserdata(L, 1), &tmp, "drover.proc.run");
}

/* drover.proc.spawn(argv [, opts]) -> proc | nil, message */
static int drv__l_spawn(lua_State *L) { return drv__proc_start(L, "drover.proc.spawn", 0); }

/* proc:wait([timeout]) -> result.  On timeout the group is stopped as for
 * opts.timeout and the result says code = 124, timed_out = true. */
static int drv__l_wait(lua_State *L) {
  drv_proc *p = drv__check_proc(L, 1, "proc:wait");
  drv_wait tmp;
  double timeout = -1;
  if (!lua_isnoneornil(L, 2)) {
    if (lua_type(L, 2) != LUA_TNUMBER) return drv__argerror(L, "proc:wait", "timeout", "number", 2);
    timeout = lua_tonumber(L, 2);
    if (!(timeout >= 0) || timeout > 1e9)
      return luaL_error(L, "proc:wait: bad argument 'timeout' (must be >= 0)");
  }
  lua_settop(L, 1);
  if (p->done) return drv__proc_result(L, 1);
  drv__wait_init(&tmp, L);
  if (timeout >= 0 && !p->term_sent) {
    /* Arm the deadline, or bring an existing one (opts.timeout) forward. */
    uint64_t ms = (uint64_t)(timeout * 1000.0 + 0.5);
    if (!(p->timer_open && uv_is_active((uv_handle_t *)&p->timer) &&
          uv_timer_get_due_in(&p->timer) <= ms))
      drv__proc_timer_start(p, timeout);
  }
  return drv__proc_await(L, p, &tmp, "proc:wait");
}

/* proc:kill([signal]) -> true | nil, message.  signal: a number or a name
 * ("TERM", "SIGKILL", "kill"); default SIGTERM.  Sent to the whole group. */
static int drv__l_kill(lua_State *L) {
  drv_proc *p = drv__check_proc(L, 1, "proc:kill");
  int sig = SIGTERM, r;
  int t = lua_type(L, 2);
  if (t == LUA_TNUMBER || t == LUA_TSTRING) {
    if ((sig = drv__signum(L, 2)) < 0)
      return luaL_error(L, "proc:kill: bad argument 'signal' (unknown signal '%s')", lua_tostring(L, 2));
  } else if (t != LUA_TNONE && t != LUA_TNIL) {
    return drv__argerror(L, "proc:kill", "signal", "signal name or number", 2);
  }
  r = drv__proc_signal(p, sig);
  if (r != 0) {
    lua_pushnil(L);
    lua_pushstring(L, uv_strerror(r));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static void drv__proc_write_cancel(drv_wait *w) {
  /* Abandon stdin: closing it fails the pending write with ECANCELED,
   * which wakes the writer (the task then raises "cancelled"). */
  drv_pwrite *pw = (drv_pwrite *)((char *)w - offsetof(drv_pwrite, wait));
  drv__proc_close_stdin(pw->p);
}

/* proc:write(data) -> true | nil, message.  Waits until the data is written
 * to the pipe (not until the child has read it). */
static int drv__l_write(lua_State *L) {
  drv_proc *p = drv__check_proc(L, 1, "proc:write");
  size_t len;
  const char *data;
  drv_pwrite *w;
  drv_wait tmp;
  int r;
  if (lua_type(L, 2) != LUA_TSTRING) return drv__argerror(L, "proc:write", "data", "string", 2);
  data = lua_tolstring(L, 2, &len);
  if (!p->in_piped)
    return luaL_error(L, "proc:write: stdin is not a pipe (spawn with opts.stdin = true)");
  if (!p->in_open || p->in_close_pending) { /* closed by proc:close(), or the child finished */
    lua_pushnil(L);
    lua_pushliteral(L, "stdin is closed");
    return 2;
  }
  drv__wait_init(&tmp, L);
  r = drv__proc_send(p, data, len, &w);
  if (r == 0) { lua_pushboolean(L, 1); return 1; }
  if (r < 0) {
    lua_pushnil(L);
    lua_pushstring(L, uv_strerror(r));
    return 2;
  }
  w->wait = tmp;
  w->wait.cancel = drv__proc_write_cancel;
  w->waited = 1;
  lua_settop(L, 1);
  return drv__await(L, &w->wait);
}

/* proc:close() closes stdin (after the writes in flight).  Idempotent. */
static int drv__l_close(lua_State *L) {
  drv_proc *p = drv__check_proc(L, 1, "proc:close");
  if (p->in_open) {
    if (p->writes > 0) p->in_close_pending = 1;
    else drv__proc_close_stdin(p);
  }
  return 0;
}

static int drv__l_is_running(lua_State *L) {
  drv_proc *p = drv__check_proc(L, 1, "proc:is_running");
  lua_pushboolean(L, !p->exited);
  return 1;
}

static int drv__l_index(lua_State *L) {
  drv_proc *p = drv__check_proc(L, 1, "proc");
  const char *k = lua_tostring(L, 2);
  if (k && strcmp(k, "pid") == 0) {
    lua_pushinteger(L, p->pid);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int drv__l_tostring(lua_State *L) {
  drv_proc *p = drv__check_proc(L, 1, "proc");
  lua_pushfstring(L, "drover.proc(%d, %s)", p->pid, p->exited ? "exited" : "running");
  return 1;
}

/* The userdata is collected: the process itself carries on (drained and
 * reaped by the loop) unless the engine is closing, which kills it. */
static int drv__l_gc(lua_State *L) {
  drv_proc **box = (drv_proc **)lua_touserdata(L, 1);
  drv_proc *p = *box;
  if (p == NULL) return 0;
  *box = NULL;
  if (p->in_open) { /* nobody can write any more */
    if (p->writes > 0) p->in_close_pending = 1;
    else drv__proc_close_stdin(p);
  }
  drv__proc_unref(p);
  return 0;
}

int drv__open_proc(lua_State *L) {
  static const luaL_Reg methods[] = {{"wait", drv__l_wait},   {"kill", drv__l_kill},
                                     {"write", drv__l_write}, {"close", drv__l_close},
                                     {"is_running", drv__l_is_running}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"run", drv__l_run}, {"spawn", drv__l_spawn}, {NULL, NULL}};
  if (luaL_newmetatable(L, DRV_PROC_MT)) {
    luaL_newlib(L, methods);
    lua_pushcclosure(L, drv__l_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, drv__l_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, drv__l_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &drv__procs_key) == LUA_TNIL) {
    drv_procs *S = (drv_procs *)lua_newuserdatauv(L, sizeof *S, 1);
    memset(S, 0, sizeof *S);
    S->E = drv__engine(L);
    S->cbL = lua_newthread(L);
    lua_setiuservalue(L, -2, 1); /* anchors the callback thread */
    /* How children are started, decided once per engine.  DROVER_SPAWN=uv
     * forces libuv's uv_spawn (fork); so does a kernel without pidfds.
     * DROVER_SPAWN=pidfd_open starts as if clone() had refused CLONE_PIDFD
     * (spawn.c then opens each pidfd after the clone).  Both keep a
     * fallback tested on any kernel. */
    {
      const char *m = getenv("DROVER_SPAWN");
      S->uv_spawn = (m && strcmp(m, "uv") == 0) || !drv__spawn_have_pidfd();
      S->spawner.no_clone_pidfd = m && strcmp(m, "pidfd_open") == 0;
    }
    lua_rawsetp(L, LUA_REGISTRYINDEX, &drv__procs_key);
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
