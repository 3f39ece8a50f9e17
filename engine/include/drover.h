/*
 * drover.h -- the public C API of drover, a Lua-scriptable workflow engine.
 *
 * An engine is one Lua 5.4 state plus one libuv loop.  Lua code runs as
 * tasks (coroutines) on that loop; primitives that wait (processes, HTTP,
 * timers) suspend the task, not the thread.
 *
 * Threads: an engine belongs to the thread that opened it.  One engine per
 * thread is fine (each has its own Lua state and loop); one engine must
 * never be used from two threads at once, and a host loop passed in
 * drover_options.loop must be run by that same thread.
 *
 * Strings: every const char * argument is copied or used before the call
 * returns; JSON results are malloc'd strings the caller frees with
 * drover_free().  docs/embedding.md is the guide to this header.
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
#define DROVER_ENOTIMPL (-5) /* the backend does not implement the operation */

/* The library is built with -fvisibility=hidden: these functions are all
 * it exports. */
#if defined(__GNUC__) || defined(__clang__)
#define DROVER_API __attribute__((visibility("default")))
#else
#define DROVER_API
#endif

typedef struct drover drover;

/* Log callback: level is "debug", "info", "warn" or "error"; message has no
 * trailing newline.  Gets the engine's own messages: drover.log() lines
 * from Lua, errors of tasks nobody joined, errors of tasks drover_start
 * began, server handler failures.  Called on the engine's thread, from
 * inside the engine: it must not call back into the engine. */
typedef void (*drover_log_fn)(void *ud, const char *level, const char *message);

typedef struct drover_options {
  const char *home;      /* tracking store directory, used even when
                            $DROVER_HOME is set; NULL: $DROVER_HOME, else
                            $XDG_DATA_HOME/drover, else ~/.local/share/drover */
  const char *path;      /* extra backend directories, ':'-separated, searched
                            after $DROVER_PATH's */
  const char *lua_dir;   /* the directory holding drover/init.lua; NULL:
                            $DROVER_LUA_DIR, else the first of: next to
                            libdrover (LIBDIR/../share/drover/lua) or to the
                            program (BINDIR/../lua, BINDIR/../share/drover/lua),
                            the PREFIX drover was installed with
                            (PREFIX/share/drover/lua), the first drover/init.lua
                            on the Lua path ($LUA_PATH_5_4 or $LUA_PATH).  The
                            backends directory is the one next to it
                            (lua_dir/../backends). */
  uv_loop_t *loop;       /* run on the host's loop instead of drover's own; NULL: own */
  drover_log_fn log;     /* NULL: the engine's messages go to stderr */
  void *log_ud;
  int exit_on_signal;    /* 1: on SIGINT/SIGTERM/SIGHUP end every child process
                            group the engine started and exit(128 + signal), as
                            a command-line program should; embedders leave it 0 */
} drover_options;

/*
 * drover_open -- create an engine.  opts may be NULL for defaults.
 * Returns NULL only when out of memory.  If the engine could not be set up,
 * it is still returned and drover_errmsg() says why in one line, for
 * example "drover_open: Lua library not found in DIR (set lua_dir or
 * DROVER_LUA_DIR)" when DIR/drover/init.lua does not exist.  Such an
 * engine can only be closed: every call that runs Lua (drover_dofile,
 * drover_dostring, drover_call, drover_register, drover_backend_load,
 * drover_backend_call, drover_exec, drover_start) returns DROVER_ELOAD with
 * that same message.  So check *drover_errmsg(D) after drover_open.
 */
DROVER_API drover *drover_open(const drover_options *opts);

/* drover_close -- close the engine, its Lua state and (if owned) its loop,
 * and free it.  Ownership: the caller owns D from drover_open to
 * drover_close; after drover_close, D must not be passed to any other
 * drover_* function.  drover_close(NULL), and drover_close of an engine
 * already closed, do nothing (drover_close checks D against the engines
 * drover_open returned and has not closed, under a lock).  Set the pointer
 * to NULL after closing all the same: a later drover_open may return the
 * same address, and closing the stale pointer would then close that
 * engine. */
DROVER_API void drover_close(drover *D);

/* drover_errmsg -- the message of the last failed call on D ("" if none).
 * Valid until the next call on D.  drover_errmsg(NULL) returns a message
 * saying that the engine is NULL. */
DROVER_API const char *drover_errmsg(const drover *D);

/*
 * drover_dofile -- run a Lua script as a task on the engine's loop, with the
 * global `arg` set from argv (argv[0] is the script name), until it and every
 * task it spawned finish (transitively, and tasks callbacks start
 * meanwhile; not tasks it did not start, such as drover_start's).  On
 * failure the message holds file:line and a traceback.
 */
DROVER_API int drover_dofile(drover *D, const char *path, int argc, const char *const *argv);

/* drover_dostring -- as drover_dofile, for a chunk of code. */
DROVER_API int drover_dostring(drover *D, const char *code, const char *chunkname);

/* drover_call -- call the function on the engine's Lua stack (pushed
 * before its nargs arguments) as a task, like drover_dofile does with a
 * script, until it and every task it spawned finish.  The function and its
 * arguments are popped; results are discarded. */
DROVER_API int drover_call(drover *D, int nargs);

/* drover_lua -- the engine's lua_State, for advanced use (push your own
 * modules, inspect results).  Do not lua_close it. */
DROVER_API lua_State *drover_lua(drover *D);

/* drover_loop -- the engine's libuv loop (NULL only if D is NULL or its
 * Lua state could not even be set up). */
DROVER_API uv_loop_t *drover_loop(drover *D);

/*
 * drover_register -- make a C function callable from Lua as
 * require("drover").host.NAME(...), in scripts, workflows and backends run
 * by this engine (inside tasks too).  fn is an ordinary lua_CFunction: it
 * reads its arguments from the Lua stack and returns the number of results
 * it pushed; to fail, it raises with luaL_error (the task sees a Lua
 * error).  ud is handed back by drover_host_ud(L).  fn must not call
 * drover_* functions on the same engine.  Registering a NAME again
 * replaces it.  NAME must be a Lua identifier (letters, digits and _, not
 * starting with a digit, not a reserved word such as "end"): DROVER_EARG
 * otherwise.  Host functions exist only
 * in this process: runs a backend starts elsewhere (the local backend's
 * worker processes) do not have them.
 */
DROVER_API int drover_register(drover *D, const char *name, lua_CFunction fn, void *ud);

/* drover_host_ud -- inside a function registered with drover_register,
 * the ud it was registered with. */
DROVER_API void *drover_host_ud(lua_State *L);

/*
 * drover_backend_load -- load the backend NAME (the first NAME.lua in
 * drover's backends/ directory, $DROVER_PATH, drover_options.path,
 * ./backends) or the backend file at a path (any name containing '/' or
 * ending in .lua).  Returns DROVER_ELOAD with the reason when it is not
 * found ("unknown backend 'NAME' (looked in DIRS)"), does not compile (the
 * message holds file:line) or does not return a subclass of
 * drover.BaseOrchestrator.  drover_backend_call loads backends itself;
 * this only checks early.
 */
DROVER_API int drover_backend_load(drover *D, const char *backend);

/*
 * drover_backend_call -- call contract operation OP ("package", "deploy",
 * "run", "stop", "cancel", "status", "logs" or "list") of backend BACKEND (a name or
 * a path, as for drover_backend_load), configured with config_json (a JSON
 * object, NULL for {}).  args_json is a JSON array of the operation's
 * arguments (NULL for none), for example for the local backend:
 *
 *   package  ["Class", "module", "entrypoint", {"path": "dir"}]
 *   deploy   ["name", {"package": "<id>", "params": {...}}]
 *   run      ["name", {...params}]           status  ["<run id>"]
 *
 * On success *out_json (if out_json is not NULL) is a JSON array of what
 * the operation returned (run: ["<id>", "<url>"]; list and logs: a list,
 * [] when empty, so [[]]); free it with drover_free.  On failure *out_json is NULL and the code says what went
 * wrong: DROVER_EARG (NULL arguments, an unknown operation, JSON that does
 * not parse or has the wrong shape, a config the backend refuses),
 * DROVER_ELOAD (the backend could not be loaded), DROVER_ENOTIMPL
 * ("backend 'NAME' does not implement OP", or a hook OP needs), DROVER_ERUN (the operation
 * raised; the message is its error).  One backend instance is kept per
 * (backend, config_json) pair for the engine's life.  "{}" is not an empty
 * args_json ("args_json must be a JSON array"), nor "[]" a config.  Runs the loop until
 * the operation and the tasks it spawned finish (as drover_dofile).
 */
DROVER_API int drover_backend_call(drover *D, const char *backend, const char *config_json, const char *op,
                                   const char *args_json, char **out_json);

/*
 * drover_exec -- run the workflow file PATH as one tracked flow run, as
 * `drover exec PATH` does: the chunk gets the parameters (params_json, a
 * JSON object, NULL for {}) as its argument; drover.task/drover.flow
 * calls inside are recorded under the flow run in the store
 * (drover_options.home); print() output goes to stdout and to the run's
 * logs.  *out_json (if out_json is not NULL) receives
 * {"id": ..., "name": ..., "state": ..., "message": ..., "result": ...}
 * (message null when the run has none; result what the chunk returned,
 * null when nothing or when it failed); free it with drover_free.  Returns DROVER_OK when the run COMPLETED, DROVER_ERUN when it
 * FAILED (or was cancelled; *out_json is still set and the message names
 * the run and its error), DROVER_ELOAD when the file does not compile
 * (file:line in the message), DROVER_EARG for bad arguments or JSON.
 */
DROVER_API int drover_exec(drover *D, const char *path, const char *params_json, char **out_json);

/*
 * drover_start -- start a chunk of Lua code as a task and return at once,
 * without running the loop: for hosts that own the loop (see
 * drover_options.loop) and drive it themselves, with uv_run or
 * drover_step.  An error in the task goes to the log callback (level
 * "error", with a traceback).  Returns DROVER_ELOAD if the code does not
 * compile.
 */
DROVER_API int drover_start(drover *D, const char *code, const char *chunkname);

/*
 * drover_step -- run the engine's loop once without blocking
 * (uv_run(loop, UV_RUN_NOWAIT)): due timers, ready I/O, and the tasks that
 * are ready to resume.  Returns the number of tasks still alive (0 when
 * everything started has finished), or DROVER_EARG (D is NULL, or called
 * from inside the engine's own loop), or DROVER_ELOAD (drover_open failed
 * before the loop existed).  A host that runs the shared loop
 * with uv_run does not need it: drover's handles live on that loop.
 */
DROVER_API int drover_step(drover *D);

/* drover_free -- free a string drover returned (the *out_json results).
 * NULL is ignored. */
DROVER_API void drover_free(void *p);

#ifdef __cplusplus
}
#endif
#endif
