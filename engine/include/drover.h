/*
 * drover.h -- the public C API of drover, a Lua-scriptable workflow engine.
 *
 * An engine is one Lua 5.4 state plus one libuv loop.  Lua code runs as
 * tasks (coroutines) on that loop; primitives that wait (processes, HTTP,
 * timers) suspend the task, not the thread.
 *
 * Threads: an engine belongs to the thread that opened it.  Several engines
 * in several threads are fine; one engine must never be used from two
 * threads at once.
 *
 * Errors: functions that can fail return DROVER_OK (0) or a negative
 * DROVER_E* code, and leave a message readable with drover_errmsg().  The
 * library never calls exit() and never writes to stdout on its own.
 */
#ifndef DROVER_H
#define DROVER_H

#ifdef __cplusplus
extern "C" {
#endif

#include <lua.h>
#include <uv.h>

#define DROVER_VERSION "0.1.0"

#define DROVER_OK 0
#define DROVER_EARG (-1)    /* an argument was NULL or invalid */
#define DROVER_ELOAD (-2)   /* a script or backend could not be loaded (syntax error...) */
#define DROVER_ERUN (-3)    /* Lua code raised an error */
#define DROVER_ENOMEM (-4)  /* out of memory */

typedef struct drover drover;

/* Log callback: level is "debug", "info", "warn" or "error". */
typedef void (*drover_log_fn)(void *ud, const char *level, const char *message);

typedef struct drover_options {
  const char *home;      /* tracking store directory (DROVER_HOME); NULL: default */
  const char *path;      /* extra backend directories, ':'-separated (DROVER_PATH) */
  const char *lua_dir;   /* where lua/drover/ lives; NULL: found automatically */
  uv_loop_t *loop;       /* run on the host's loop instead of drover's own; NULL: own */
  drover_log_fn log;     /* NULL: messages go to stderr */
  void *log_ud;
  int exit_on_signal;    /* 1: on SIGINT/SIGTERM/SIGHUP end every child process
                            group the engine started and exit(128 + signal), as
                            a command-line program should; embedders leave it 0 */
} drover_options;

/*
 * drover_open -- create an engine.  opts may be NULL for defaults.
 * Returns NULL only when out of memory.  If the engine could not be set up
 * (for example the Lua library was not found), it is still returned and
 * drover_errmsg() says why; the first call that needs the library fails.
 */
drover *drover_open(const drover_options *opts);

/* drover_close -- close the engine, its Lua state and (if owned) its loop.
 * NULL is ignored. */
void drover_close(drover *D);

/* drover_errmsg -- the message of the last failed call on D ("" if none).
 * Valid until the next call on D.  drover_errmsg(NULL) returns a message
 * saying that the engine is NULL. */
const char *drover_errmsg(const drover *D);

/*
 * drover_dofile -- run a Lua script as a task on the engine's loop, with the
 * global `arg` set from argv (argv[0] is the script name), until it and every
 * task it spawned finish.  On failure the message holds file:line and a
 * traceback.
 */
int drover_dofile(drover *D, const char *path, int argc, const char *const *argv);

/* drover_dostring -- as drover_dofile, for a chunk of code. */
int drover_dostring(drover *D, const char *code, const char *chunkname);

/* drover_call -- call the function on the engine's Lua stack (pushed
 * before its nargs arguments) as a task, like drover_dofile does with a
 * script, until it and every task it spawned finish.  The function and its
 * arguments are popped; results are discarded. */
int drover_call(drover *D, int nargs);

/* drover_lua -- the engine's lua_State, for advanced use (push your own
 * modules, inspect results).  Do not lua_close it. */
lua_State *drover_lua(drover *D);

/* drover_loop -- the engine's libuv loop. */
uv_loop_t *drover_loop(drover *D);

#ifdef __cplusplus
}
#endif
#endif
