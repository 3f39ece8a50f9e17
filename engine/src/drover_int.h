/*
 * drover_int.h -- private interfaces shared by the engine's C files.
 *
 * Nothing here is part of the public API (that is engine/include/drover.h).
 * Private symbols use the drv__ prefix, like libuv's uv__.
 *
 * The one idea every primitive builds on is the *wait*:
 *
 *   A Lua call that has to wait for libuv (a timer, a child's exit, an HTTP
 *   response) starts the libuv operation, then ends with
 *
 *       return drv__await(L, &ctx->wait);
 *
 *   When libuv reports completion, the primitive's callback pushes its
 *   results onto drv__wait_stack(&ctx->wait) and calls
 *   drv__wake(&ctx->wait, nresults).  Those values become the return values
 *   of the original Lua call.
 *
 *   Inside a task (a coroutine the scheduler owns), drv__await yields the
 *   coroutine with lua_yieldk and the scheduler resumes it from its run
 *   queue after the wake -- the OpenResty cosocket model.  Outside any task
 *   (a plain script's main chunk), drv__await runs the loop itself until the
 *   wait is woken, so primitives work in plain scripts too.
 *
 *   The drv_wait must stay valid until drv__wake has returned; after that
 *   the primitive may free it (typically in a uv_close callback).
 */
#ifndef DROVER_INT_H
#define DROVER_INT_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>
#include <stddef.h>
#include <stdint.h>

#define DRV_VERSION "0.1.0"

/* The engine is compiled with -fvisibility=hidden.  DRV_EXPORT marks what
 * must stay visible: luaopen_drover_core (stock lua5.4 loads core.so), the
 * server plugin's entry point, and the engine functions that plugin
 * resolves from the drover binary (engine/cli/server_loader.c).
 * libdrover.so exports none of the drv__ ones (engine/libdrover.map). */
#define DRV_EXPORT __attribute__((visibility("default")))
int luaopen_drover_core(lua_State *L) DRV_EXPORT;
int drv__server_plugin_open(lua_State *L) DRV_EXPORT;

typedef struct drv_engine drv_engine;
typedef struct drv_task drv_task;
typedef struct drv_group drv_group; /* the tasks one blocking drover.run waits for */
typedef struct drv_wait drv_wait;

/* Called when the waiting task is cancelled: stop the operation early (close
 * the timer, kill the process group, abort the transfer).  The operation must
 * still complete through drv__wake; the task then raises "cancelled". */
typedef void (*drv_cancel_fn)(drv_wait *w);

struct drv_wait {
  drv_engine *E;
  lua_State *L;         /* the waiting thread: a task's coroutine or the main thread */
  drv_task *task;       /* NULL when blocking outside any task */
  drv_cancel_fn cancel; /* optional */
  int done;             /* set by drv__wake */
  int nres;             /* number of values pushed by the waker */
};

/*
 * A resource is anything a primitive keeps open on the loop beyond one call
 * (a signal watcher, a spawned process and its pipes, the curl multi).
 * Linked into the engine while alive, so that closing the engine can close
 * each one properly -- with its own close callbacks that free its memory --
 * instead of leaking it.  close() must start closing every handle of the
 * resource and call drv__res_unlink; the loop is then run until the close
 * callbacks have fired.
 */
typedef struct drv_res drv_res;
struct drv_res {
  void (*close)(drv_res *r);
  drv_res *prev, *next;
};

struct drv_engine {
  uv_loop_t *loop;
  uv_loop_t own_loop;   /* used when the host gave no loop */
  int owns_loop;
  lua_State *L;         /* main state */
  int loop_depth;       /* > 0 while uv_run is on the C stack */
  uv_idle_t runq_idle;  /* keeps the loop spinning while the run queue has work */
  drv_task *runq_head, *runq_tail;
  int live_tasks;       /* tasks not yet finished */
  drv_group *run_group; /* the blocking drover.run looping now (sched.c) */
  int blocking_done;    /* a wait outside any task was woken (see drv__await) */
  int blocking_nres;
  int closing;
  drv_res resources;    /* list head of live resources (circular) */
  void *http;           /* http.c state (curl multi), created lazily */
  void (*http_free)(drv_engine *E);
  /* Where the engine's own messages go (drover_options.log); NULL: stderr. */
  void (*log)(void *ud, const char *level, const char *message);
  void *log_ud;
};

/* ---- engine.c ---------------------------------------------------------- */
DRV_EXPORT drv_engine *drv__engine(lua_State *L);  /* the engine this state belongs to */
void drv__engine_attach(lua_State *L, uv_loop_t *loop); /* creates the engine for L (idempotent) */
void drv__searcher_install(lua_State *L); /* require reads fresh FILE.luac beside FILE.lua (searcher.c) */
DRV_EXPORT void drv__res_link(drv_engine *E, drv_res *r, void (*close)(drv_res *r));
DRV_EXPORT void drv__res_unlink(drv_res *r);  /* idempotent */
/* Run the loop once (blocking); used by drv__await outside tasks and by drover.run. */
int drv__run_once(drv_engine *E);
/* A message from the engine itself (level "debug", "info", "warn", "error"):
 * to the host's log callback if it set one, else a line on stderr. */
DRV_EXPORT void drv__log(drv_engine *E, const char *level, const char *fmt, ...);

/* ---- sched.c ----------------------------------------------------------- */
drv_task *drv__current_task(lua_State *L);          /* NULL when L is not a task */
DRV_EXPORT void drv__wait_init(drv_wait *w, lua_State *L);  /* bind w to the calling thread */
DRV_EXPORT lua_State *drv__wait_stack(drv_wait *w);  /* where the waker pushes results */
DRV_EXPORT int drv__await(lua_State *L, drv_wait *w);  /* use as: return drv__await(L, w); */
/* Like drv__await, but k(L, LUA_YIELD, kctx) produces the results after the wake. */
int drv__awaitk(lua_State *L, drv_wait *w, lua_KFunction k, lua_KContext kctx);
DRV_EXPORT int drv__task_cancel(drv_task *t);  /* request cancellation */
/* Can L wait through drv__await (a task that can yield, or outside any
 * task with the loop not running)?  Where not, drv__wait_init raises. */
int drv__can_wait(lua_State *L);
DRV_EXPORT void drv__wake(drv_wait *w, int nres);
int drv__open_sched(lua_State *L);                  /* pushes nothing; adds fields to table at -1 */
void drv__sched_init(lua_State *L);                 /* metatables, registry (idempotent) */
int drv__run(lua_State *L);                         /* drover.run(fn, ...) */
/* On SIGINT/SIGTERM/SIGHUP: close every engine resource (ending the child
 * process groups it started), then exit(128 + signal). */
void drv__exit_on_signals(drv_engine *E);
void drv__sched_close(drv_engine *E);

/* ---- modules: each adds its functions to the table at the top --------- */
int drv__open_timer(lua_State *L);
int drv__open_proc(lua_State *L);
int drv__open_http(lua_State *L);
int drv__open_fs(lua_State *L);
int drv__open_json(lua_State *L);                   /* json.c: encode, decode, null */
int drv__open_db(lua_State *L);
int drv__open_pg(lua_State *L);                     /* pg.c: PostgreSQL (libpq, loaded lazily) */
int drv__open_signal(lua_State *L);
int drv__open_event(lua_State *L);
int drv__open_server(lua_State *L);
/* signal number from an integer in [0, NSIG) or a name ("TERM", "SIGTERM", "kill"); -1 if neither */
int drv__signum(lua_State *L, int idx);

/* ---- pset.c: many fds behind one libuv watch (an epoll set of our own) ---- */
typedef struct drv_pset drv_pset;
typedef struct drv_pent drv_pent;
typedef void (*drv_pent_cb)(drv_pent *e);
/* One descriptor in a set, embedded in its owner.  fd is -1 when out. */
struct drv_pent {
  int fd;
  unsigned slot;
  int held;            /* counted in the set's loop reference */
  drv_pent_cb cb;      /* called on the loop when fd is readable (or hung up) */
};
/* A new set on E's loop, closed with the engine; NULL if the kernel says no. */
drv_pset *drv__pset_new(drv_engine *E);
/* Watch fd (readable) as e, which must have fd -1; the set takes the fd:
 * it is closed by drv__pset_del.  Returns 0 or a libuv error (fd untouched). */
int drv__pset_add(drv_pset *s, drv_pent *e, int fd, drv_pent_cb cb);
/* Whether e keeps the loop alive (not, when added). */
void drv__pset_hold(drv_pset *s, drv_pent *e, int on);
/* Stop watching e and close its fd; idempotent.  Must come before e's
 * memory is freed. */
void drv__pset_del(drv_pset *s, drv_pent *e);

/* ---- spawn.c: starting a child as execvp would, on a stack kept for it ---- */
#define DRV_PATH_CACHE 16
enum { DRV_CHILD_NULL = -1, DRV_CHILD_KEEP = -2 };
/* What a child is to be.  fd[i] is what becomes its descriptor i: an fd
 * above 2 (dup'ed there), i itself (drover's own, inherited: only the
 * child's copy loses close-on-exec), DRV_CHILD_NULL (/dev/null) or
 * DRV_CHILD_KEEP (left as it is: closed, since drover's are close-on-exec). */
typedef struct {
  const char *file;   /* argv[0]: looked up in envp's PATH unless it has a slash */
  char **argv, **envp;
  const char *cwd;    /* NULL: drover's own */
  int fd[3];
} drv_child;
typedef struct {
  char *key;          /* name NUL PATH NUL found path, one allocation; NULL: free */
  const char *found;  /* inside key */
  uint64_t hash, at;  /* at: when found (ms, monotonic) */
} drv_path_entry;
/* Per engine, inside the process module's state (zeroed): the child's
 * stack, mapped at the first spawn and unmapped when the engine closes,
 * and the PATH lookups of the last second. */
typedef struct {
  drv_res res;
  void *stack;
  int closed, no_clone_pidfd;
  drv_path_entry cache[DRV_PATH_CACHE];
} drv_spawner;
/* Start c in a new session, every signal at its default disposition and
 * none blocked.  Returns 0 with *pid and *pidfd (close-on-exec, ours to
 * close) set, or an errno, and then no child is left behind. */
int drv__spawn(drv_engine *E, drv_spawner *sp, const drv_child *c, pid_t *pid, int *pidfd);
/* Can this kernel give pidfds (pidfd_open, Linux 5.3)?  Asked once per
 * engine: without them children are started with uv_spawn. */
int drv__spawn_have_pidfd(void);

/* ---- lalloc.c: the allocator of the states drover_open makes -------------- */
typedef struct drv_lalloc drv_lalloc;
/* A pool for one Lua state; NULL when the build has no pool (AddressSanitizer),
 * which drv__lalloc takes as "use realloc and free". */
drv_lalloc *drv__lalloc_new(void);
/* Free the pool: after lua_close of its state. */
void drv__lalloc_free(drv_lalloc *A);
/* lua_newstate with the pool's allocator, plus what luaL_newstate adds (the
 * panic function, warnings off until "@on"); NULL if out of memory. */
lua_State *drv__lalloc_newstate(drv_lalloc *A);

/* db.c: is the value at idx a drover.db.blob?  For functions whose
 * upvalue 2 is the blob metatable, as db.c registers them. */
int drv__db_isblob(lua_State *L, int idx);

/* ---- dbwriter.c: batches written on a connection of their own, off the loop ---- */
typedef struct drv_dbw drv_dbw;
/* db:submit: start writing the drover.db.batch at idx through *slot (made
 * on first use with these settings) and push true; push false and a
 * message when the writer's connection cannot be opened; raises on a wrong
 * argument or while the previous batch is unclaimed.  Returns the count. */
int drv__dbw_submit(lua_State *L, drv_dbw **slot, const char *path, int busy_ms, int fk, int wal,
                    int idx);
/* db:wait_batch: pushes true, or false and the message (may yield). */
int drv__dbw_wait(lua_State *L, drv_dbw *w);
/* db:batch_done: 1 when no batch is out or its worker has finished. */
int drv__dbw_done(drv_dbw *w);
/* The handle closes: frees w now, or when its batch out has finished. */
void drv__dbw_close(drv_dbw *w);
/* Creates the drover.db.batch metatable; the blob metatable at the top. */
void drv__dbw_register(lua_State *L);
int drv__dbw_new_batch(lua_State *L); /* drover.db.batch() */

/* ---- util -------------------------------------------------------------- */
/* Make the array *p (capacity *cap elements of `elem` bytes) hold at least
 * `need`, doubling from `first`; 0, or -1 when out of memory (*p is kept). */
int drv__grow(void **p, size_t *cap, size_t need, size_t elem, size_t first);
/* Raise "drover.MOD.FN: bad argument NAME (expected T, got U)". */
DRV_EXPORT int drv__argerror(lua_State *L, const char *fname, const char *argname,
                             const char *expected, int idx);
/* Optional field of an options table at idx, checked for type. */
DRV_EXPORT const char *drv__opt_string(lua_State *L, int idx, const char *fname, const char *key,
                                       const char *dflt);
DRV_EXPORT double drv__opt_number(lua_State *L, int idx, const char *fname, const char *key,
                                  double dflt);
int drv__opt_bool(lua_State *L, int idx, const char *fname, const char *key, int dflt);
void drv__opt_known(lua_State *L, int idx, const char *fname, const char *const keys[]);

#endif
