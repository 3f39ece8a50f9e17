/*
 * dbwriter.c -- a drover.db connection's writer: a batch of statements
 * written in one transaction by a second connection to the same file, on a
 * libuv worker thread, while the loop thread goes on.
 *
 *   b = drover.db.batch()          an empty batch
 *   b:run(sql, ...)                append a statement; its values are copied
 *   b:run_rows(sql, q, i, k)       append one statement whose values are
 *                                  those of the queue entries q[i..i+k-1]
 *                                  ({sql, n, v1..vn}), one after the other
 *   db:submit(b) -> true | false, message
 *                                  start writing b (b is left empty); one
 *                                  batch per connection at a time.  false:
 *                                  the writer's connection cannot be opened
 *                                  (no descriptor left...): b is kept, for
 *                                  the caller to write another way
 *   db:batch_done() -> boolean     is no batch out, or has it been written
 *                                  (wait_batch would not wait)?
 *   db:wait_batch() -> true | false, message
 *                                  wait until it is written (committed, or
 *                                  rolled back and why); true at once when
 *                                  no batch is out
 *
 * Why a thread.  The tracking store writes a row per task run.  SQLite's
 * work for it (binding, the B-trees of the table and its indexes, the
 * count trigger, the WAL's pages) was two thirds of a tracked call's cost
 * (issue 13: 14 of 22 us), all of it on the loop thread, between the
 * tracker's Lua.  Here it runs beside it: the store queues rows while the
 * batch before them is written.  Values are copied into the batch once (so
 * the Lua side may change or collect them), and the worker binds from the
 * copy.
 *
 * Rules (db.c's header says the rest):
 *   - The writer has its own connection, opened at the first submit with the
 *     handle's settings (busy_timeout, synchronous=NORMAL under WAL,
 *     foreign_keys).  A lock held by another process is waited for in the
 *     worker thread with SQLite's own busy_timeout: blocking there blocks
 *     no task.  After busy_timeout the batch fails with db.c's message.
 *   - A batch is one transaction (BEGIN IMMEDIATE ... COMMIT): all of it is
 *     written or none of it, and the message names the statement's error.
 *   - Ordering against the loop thread's own connection is the caller's
 *     part: the store waits for a batch before any other write of its own
 *     (store.lua: Store:locked).  Both connections are to one file, so a
 *     write of the other connection meanwhile waits for the batch's lock.
 *   - wait_batch yields inside a task, runs the loop outside one, and where
 *     neither can be done (a C-call boundary) blocks on a condition
 *     variable: the worker needs nothing from the loop to finish.  A
 *     cancelled wait leaves the result for the next wait_batch.
 *   - Closing the handle while a batch is being written lets the batch
 *     finish; the job and the writer are freed by the loop when it ends.
 *     Every job out is an engine resource, so closing the engine never
 *     wakes a task that is gone.
 */
#include "drover_int.h"

#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DRV_BATCH_MT "drover.db.batch"
#define DRV_WSTMT_MAX 64 /* statements the writer keeps prepared */

/* ---- batches ------------------------------------------------------------------ */

typedef struct {
  int type;   /* SQLITE_NULL, SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT or SQLITE_BLOB */
  size_t len; /* TEXT and BLOB: bytes at .v.off in the batch's bytes */
  union {
    sqlite3_int64 i;
    double f;
    size_t off;
  } v;
} drv_bval;

typedef struct {
  size_t sql_off, sql_len; /* the SQL text in bytes */
  size_t first, n;         /* its values: vals[first .. first+n-1] */
} drv_bstmt;

typedef struct {
  char *bytes;
  size_t nbytes, capbytes;
  drv_bval *vals;
  size_t nvals, capvals;
  drv_bstmt *stmts;
  size_t nstmts, capstmts;
} drv_batch;

typedef struct {
  drv_batch *b; /* NULL until the first append, and after submit */
} drv_batch_ud;

static void drv__batch_free(drv_batch *b) {
  if (b == NULL) return;
  free(b->bytes);
  free(b->vals);
  free(b->stmts);
  free(b);
}

static size_t drv__bytes_add(lua_State *L, drv_batch *b, const char *s, size_t n) {
  size_t off = b->nbytes;
  /* at least one byte: an empty string binds from a non-NULL pointer, as
   * TEXT '' (SQLite binds a NULL pointer as NULL) */
  if (off + n >= b->capbytes && drv__grow((void **)&b->bytes, &b->capbytes, off + n + 1, 1, 256) != 0)
    luaL_error(L, "drover.db.batch: out of memory");
  if (n) memcpy(b->bytes + off, s, n);
  b->nbytes += n;
  return off;
}

static drv_batch *drv__batch_of(lua_State *L, const char *fname) {
  drv_batch_ud *u = (drv_batch_ud *)luaL_testudata(L, 1, DRV_BATCH_MT);
  if (u == NULL) drv__argerror(L, fname, "self", DRV_BATCH_MT, 1);
  if (u->b == NULL) {
    u->b = (drv_batch *)calloc(1, sizeof *u->b);
    if (u->b == NULL) luaL_error(L, "%s: out of memory", fname);
  }
  return u->b;
}

/* Copy the value at idx, of Lua type `type`, as parameter number `pos` of
 * the statement being appended; raises on a value SQLite cannot take
 * (db.c's wording).  (Per value of every task run: the checks that need no
 * call come first.) */
static void drv__bval_add(lua_State *L, drv_batch *b, int idx, int type, const char *fname, size_t pos) {
  drv_bval *v;
  const char *s;
  size_t n;
  if (b->nvals == b->capvals &&
      drv__grow((void **)&b->vals, &b->capvals, b->nvals + 1, sizeof *b->vals, 16) != 0)
    luaL_error(L, "%s: out of memory", fname);
  v = &b->vals[b->nvals];
  switch (type) {
  case LUA_TNIL: v->type = SQLITE_NULL; break;
  case LUA_TSTRING:
    s = lua_tolstring(L, idx, &n);
    v->type = SQLITE_TEXT;
    v->len = n;
    v->v.off = drv__bytes_add(L, b, s, n);
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      v->type = SQLITE_INTEGER;
      v->v.i = (sqlite3_int64)lua_tointeger(L, idx);
    } else {
      v->type = SQLITE_FLOAT;
      v->v.f = lua_tonumber(L, idx);
    }
    break;
  case LUA_TBOOLEAN:
    v->type = SQLITE_INTEGER;
    v->v.i = lua_toboolean(L, idx);
    break;
  case LUA_TUSERDATA:
    if (drv__db_isblob(L, idx)) {
      n = lua_rawlen(L, idx);
      v->type = SQLITE_BLOB;
      v->len = n;
      v->v.off = drv__bytes_add(L, b, (const char *)lua_touserdata(L, idx), n);
      break;
    }
    /* fall through */
  default:
    luaL_error(L, "%s: bad parameter #%d (nil, boolean, number, string or drover.db.blob "
                  "expected, got %s)", fname, (int)pos, luaL_typename(L, idx));
  }
  b->nvals++;
}

/* Start a statement; its values are appended next. */
static drv_bstmt *drv__bstmt_add(lua_State *L, drv_batch *b, int idx, const char *fname) {
  size_t n;
  const char *sql;
  drv_bstmt *st, *prev;
  if (lua_type(L, idx) != LUA_TSTRING) drv__argerror(L, fname, "sql", "string", idx);
  sql = lua_tolstring(L, idx, &n);
  if (drv__grow((void **)&b->stmts, &b->capstmts, b->nstmts + 1, sizeof *b->stmts, 16) != 0)
    luaL_error(L, "%s: out of memory", fname);
  st = &b->stmts[b->nstmts];
  prev = b->nstmts ? st - 1 : NULL;
  /* runs of one statement (most of a store's batch) share one copy of it */
  if (prev && prev->sql_len == n && memcmp(b->bytes + prev->sql_off, sql, n) == 0) {
    st->sql_off = prev->sql_off;
  } else {
    st->sql_off = drv__bytes_add(L, b, sql, n);
  }
  st->sql_len = n;
  st->first = b->nvals;
  st->n = 0;
  b->nstmts++;
  return st;
}

/* b:run(sql, ...) */
static int drv__l_batch_run(lua_State *L) {
  static const char *F = "drover.db.batch.run";
  drv_batch *b = drv__batch_of(L, F);
  int top = lua_gettop(L), i;
  drv__bstmt_add(L, b, 2, F);
  /* n counts as values are added: a batch an append raised in stays
   * consistent, and fails as a whole if it is submitted anyway */
  for (i = 3; i <= top; i++) {
    drv__bval_add(L, b, i, lua_type(L, i), F, (size_t)(i - 2));
    b->stmts[b->nstmts - 1].n++;
  }
  return 0;
}

/* b:run_rows(sql, q, i, k): the values of queue entries q[i..i+k-1], each
 * {sql, n, v1..vn}, read here rather than gathered into a table in Lua. */
static int drv__l_batch_run_rows(lua_State *L) {
  static const char *F = "drover.db.batch.run_rows";
  drv_batch *b = drv__batch_of(L, F);
  lua_Integer i, k, r, j, nv;
  size_t first;
  drv_bstmt *st;
  luaL_checktype(L, 3, LUA_TTABLE);
  i = luaL_checkinteger(L, 4);
  k = luaL_checkinteger(L, 5);
  drv__bstmt_add(L, b, 2, F);
  st = &b->stmts[b->nstmts - 1]; /* stmts does not grow while values are added */
  first = b->nvals;
  for (r = i; r < i + k; r++) {
    if (lua_rawgeti(L, 3, r) != LUA_TTABLE) luaL_error(L, "%s: entry %d is not a table", F, (int)r);
    lua_rawgeti(L, -1, 2);
    nv = lua_tointeger(L, -1);
    lua_pop(L, 1);
    for (j = 1; j <= nv; j++) {
      int t = lua_rawgeti(L, -1, 2 + j);
      drv__bval_add(L, b, -1, t, F, b->nvals - first + 1);
      st->n++;
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  return 0;
}

static int drv__l_batch_len(lua_State *L) {
  drv_batch_ud *u = (drv_batch_ud *)luaL_checkudata(L, 1, DRV_BATCH_MT);
  lua_pushinteger(L, u->b ? (lua_Integer)u->b->nstmts : 0);
  return 1;
}

static int drv__l_batch_gc(lua_State *L) {
  drv_batch_ud *u = (drv_batch_ud *)lua_touserdata(L, 1);
  drv__batch_free(u->b);
  u->b = NULL;
  return 0;
}

/* drover.db.batch() */
int drv__dbw_new_batch(lua_State *L) {
  drv_batch_ud *u = (drv_batch_ud *)lua_newuserdatauv(L, sizeof *u, 0);
  u->b = NULL;
  luaL_setmetatable(L, DRV_BATCH_MT);
  return 1;
}

/* ---- the writer ------------------------------------------------------------------ */

typedef struct drv_wstmt drv_wstmt;
struct drv_wstmt {
  sqlite3_stmt *st;
  drv_wstmt *next; /* most recently used first */
  size_t len;
  char sql[];
};

typedef struct drv_dbjob drv_dbjob;

struct drv_dbw {
  sqlite3 *db;        /* the writer's connection: opened by the first job */
  char *path;
  int busy_ms, fk, wal;
  drv_wstmt *stmts;   /* prepared statements, touched by the worker only */
  int nstmts;
  uv_mutex_t mu;      /* guards job->done */
  uv_cond_t cv;
  drv_dbjob *job;     /* submitted and not yet claimed */
  int running;        /* jobs whose after-work callback has not run */
  int closed;         /* the handle is closed: the last job frees the writer */
};

struct drv_dbjob {
  drv_wait wait;      /* first: the cancel hook casts back */
  uv_work_t req;
  drv_res res;
  drv_dbw *w;
  drv_batch *b;
  char *err;          /* NULL: committed */
  int done;           /* the worker finished (under w->mu) */
  int after;          /* the after-work callback ran */
  int claimed;        /* wait_batch took the result */
  int waiting;        /* a Lua thread waits for it */
  int abandoned;      /* the engine closed: wake nobody */
};

static void drv__writer_free(drv_dbw *w) {
  while (w->stmts) {
    drv_wstmt *s = w->stmts;
    w->stmts = s->next;
    sqlite3_finalize(s->st);
    free(s);
  }
  if (w->db) sqlite3_close_v2(w->db);
  uv_mutex_destroy(&w->mu);
  uv_cond_destroy(&w->cv);
  free(w->path);
  free(w);
}

/* The message of a job whose own message could not be allocated. */
static char drv__oom[] = "drover.db.run: out of memory";

static void drv__job_free(drv_dbjob *j) {
  drv__batch_free(j->b);
  if (j->err != drv__oom) free(j->err);
  free(j);
}

/* A message for the loop thread, malloc'd (worker thread: no Lua here). */
static char *drv__msgf(const char *fmt, ...) {
  va_list ap;
  int n;
  char *m;
  va_start(ap, fmt);
  n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0 || (m = (char *)malloc((size_t)n + 1)) == NULL) return NULL;
  va_start(ap, fmt);
  vsnprintf(m, (size_t)n + 1, fmt, ap);
  va_end(ap);
  return m;
}

/* The prepared statement for sql (worker thread). */
static sqlite3_stmt *drv__wstmt(drv_dbw *w, const char *sql, size_t len, int *rc) {
  drv_wstmt **pp = &w->stmts, *s;
  int i = 0;
  for (; *pp; pp = &(*pp)->next, i++) {
    s = *pp;
    if (s->len == len && memcmp(s->sql, sql, len) == 0) {
      *pp = s->next; /* to the front */
      s->next = w->stmts;
      w->stmts = s;
      return s->st;
    }
  }
  if (w->nstmts >= DRV_WSTMT_MAX) { /* drop the least recently used */
    for (pp = &w->stmts; (*pp)->next; pp = &(*pp)->next) {}
    sqlite3_finalize((*pp)->st);
    free(*pp);
    *pp = NULL;
    w->nstmts--;
  }
  s = (drv_wstmt *)malloc(sizeof *s + len);
  if (s == NULL) {
    *rc = SQLITE_NOMEM;
    return NULL;
  }
  memcpy(s->sql, sql, len);
  s->len = len;
  *rc = sqlite3_prepare_v3(w->db, sql, (int)len, SQLITE_PREPARE_PERSISTENT, &s->st, NULL);
  if (*rc != SQLITE_OK || s->st == NULL) {
    if (*rc == SQLITE_OK) *rc = SQLITE_MISUSE; /* only a comment */
    sqlite3_finalize(s->st);
    free(s);
    return NULL;
  }
  s->next = w->stmts;
  w->stmts = s;
  w->nstmts++;
  return s->st;
}

static int drv__wbind(sqlite3_stmt *st, int i, const drv_batch *b, const drv_bval *v) {
  switch (v->type) {
  case SQLITE_INTEGER: return sqlite3_bind_int64(st, i, v->v.i);
  case SQLITE_FLOAT: return sqlite3_bind_double(st, i, v->v.f);
  case SQLITE_TEXT: return sqlite3_bind_text64(st, i, b->bytes + v->v.off, v->len, SQLITE_STATIC, SQLITE_UTF8);
  case SQLITE_BLOB:
    if (v->len == 0) return sqlite3_bind_zeroblob(st, i, 0);
    return sqlite3_bind_blob64(st, i, b->bytes + v->v.off, v->len, SQLITE_STATIC);
  default: return sqlite3_bind_null(st, i);
  }
}

/* Open the writer's connection with the handle's settings (on the loop
 * thread, at the first submit: a failure is then the caller's to handle). */
static int drv__wopen(drv_dbw *w) {
  int rc = sqlite3_open_v2(w->path, &w->db, SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_READWRITE, NULL);
  if (rc != SQLITE_OK) return rc;
  sqlite3_busy_timeout(w->db, w->busy_ms);
  if (w->wal) rc = sqlite3_exec(w->db, "PRAGMA synchronous=NORMAL", NULL, NULL, NULL);
  if (rc == SQLITE_OK)
    rc = sqlite3_exec(w->db, w->fk ? "PRAGMA foreign_keys=ON" : "PRAGMA foreign_keys=OFF", NULL, NULL, NULL);
  return rc;
}

/* Write the job's batch in one transaction (worker thread).  Returns NULL,
 * or a message (malloc'd) in db.c's words. */
static char *drv__write(drv_dbw *w, const drv_batch *b) {
  size_t k, j;
  int rc, np;
  sqlite3_stmt *st = NULL;
  char *msg = NULL;
  rc = sqlite3_exec(w->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
  for (k = 0; rc == SQLITE_OK && b && k < b->nstmts; k++) {
    const drv_bstmt *s = &b->stmts[k];
    st = drv__wstmt(w, b->bytes + s->sql_off, s->sql_len, &rc);
    if (st == NULL) break;
    np = sqlite3_bind_parameter_count(st);
    if ((size_t)np != s->n) {
      msg = drv__msgf("drover.db.run: wrong number of parameters (the statement has %d, got %d)", np,
                      (int)s->n);
      break;
    }
    for (j = 0; rc == SQLITE_OK && j < s->n; j++) rc = drv__wbind(st, (int)j + 1, b, &b->vals[s->first + j]);
    if (rc != SQLITE_OK) break;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {}
    if (rc == SQLITE_DONE) rc = SQLITE_OK;
    if (rc != SQLITE_OK) break; /* reset below, after errmsg is read */
    sqlite3_reset(st);
  }
  if (msg == NULL && rc == SQLITE_OK) {
    rc = sqlite3_exec(w->db, "COMMIT", NULL, NULL, NULL);
    if (rc == SQLITE_OK) return NULL;
  }
  if (msg == NULL) {
    if ((rc & 0xff) == SQLITE_BUSY)
      msg = drv__msgf("drover.db.run: database is locked: %s (another connection held the lock for "
                      "more than %d ms)", w->path, w->busy_ms);
    else
      msg = drv__msgf("drover.db.run: %s", sqlite3_errmsg(w->db));
  }
  if (st) sqlite3_reset(st);
  if (!sqlite3_get_autocommit(w->db)) sqlite3_exec(w->db, "ROLLBACK", NULL, NULL, NULL);
  return msg ? msg : drv__oom;
}

static void drv__job_work(uv_work_t *req) {
  drv_dbjob *j = (drv_dbjob *)req->data;
  char *err = drv__write(j->w, j->b);
  uv_mutex_lock(&j->w->mu);
  j->err = err;
  j->done = 1;
  uv_cond_broadcast(&j->w->cv);
  uv_mutex_unlock(&j->w->mu);
}

/* Push the job's result (true, or false and the message) and hand it over. */
static int drv__job_claim(lua_State *L, drv_dbjob *j) {
  if (j->err) {
    lua_pushboolean(L, 0);
    lua_pushstring(L, j->err);
  } else {
    lua_pushboolean(L, 1);
  }
  j->claimed = 1;
  if (j->w->job == j) j->w->job = NULL;
  return j->err ? 2 : 1;
}

static void drv__job_after(uv_work_t *req, int status) {
  drv_dbjob *j = (drv_dbjob *)req->data;
  drv_dbw *w = j->w;
  (void)status; /* jobs are never cancelled: each runs to its end */
  j->after = 1;
  drv__res_unlink(&j->res);
  w->running--;
  if (j->waiting && !j->abandoned) {
    int n;
    j->waiting = 0;
    n = drv__job_claim(drv__wait_stack(&j->wait), j);
    drv__wake(&j->wait, n);
  }
  if (j->claimed || j->abandoned || w->closed) {
    if (w->job == j) w->job = NULL;
    drv__job_free(j);
  }
  if (w->closed && w->running == 0) drv__writer_free(w);
}

/* The engine is closing: the job runs to its end, but the task that may
 * wait for it is gone. */
static void drv__job_res_close(drv_res *r) {
  drv_dbjob *j = (drv_dbjob *)((char *)r - offsetof(drv_dbjob, res));
  j->abandoned = 1;
  j->waiting = 0;
}

/* The waiting task was cancelled: it goes now; the result stays for the
 * next wait_batch. */
static void drv__job_cancel(drv_wait *wt) {
  drv_dbjob *j = (drv_dbjob *)wt;
  j->waiting = 0;
  drv__wake(&j->wait, 0);
}

/* ---- what db.c calls -------------------------------------------------------------- */

int drv__dbw_submit(lua_State *L, drv_dbw **slot, const char *path, int busy_ms, int fk, int wal,
                    int idx) {
  static const char *F = "drover.db.submit";
  drv_batch_ud *u = (drv_batch_ud *)luaL_testudata(L, idx, DRV_BATCH_MT);
  drv_engine *E = drv__engine(L);
  drv_dbw *w = *slot;
  drv_dbjob *j;
  int rc;
  if (u == NULL) return drv__argerror(L, F, "batch", DRV_BATCH_MT, idx);
  if (w && w->job)
    return luaL_error(L, "%s: the previous batch of %s is still out (wait_batch first)", F, path);
  if (w == NULL) {
    w = (drv_dbw *)calloc(1, sizeof *w);
    if (w == NULL) return luaL_error(L, "%s: out of memory", F);
    w->path = strdup(path);
    if (w->path == NULL || uv_mutex_init(&w->mu) != 0) {
      free(w->path);
      free(w);
      return luaL_error(L, "%s: out of memory", F);
    }
    if (uv_cond_init(&w->cv) != 0) {
      uv_mutex_destroy(&w->mu);
      free(w->path);
      free(w);
      return luaL_error(L, "%s: out of memory", F);
    }
    *slot = w;
  }
  w->busy_ms = busy_ms;
  w->fk = fk;
  w->wal = wal;
  if (w->db == NULL && (rc = drv__wopen(w)) != SQLITE_OK) {
    /* no descriptor left, say: the caller writes on its own connection */
    lua_pushboolean(L, 0);
    lua_pushfstring(L, "%s: cannot open %s for writing: %s", F, path,
                    w->db ? sqlite3_errmsg(w->db) : sqlite3_errstr(rc));
    if (w->db) sqlite3_close_v2(w->db);
    w->db = NULL;
    return 2;
  }
  j = (drv_dbjob *)calloc(1, sizeof *j);
  if (j == NULL) return luaL_error(L, "%s: out of memory", F);
  j->w = w;
  j->b = u->b;
  j->req.data = j;
  rc = uv_queue_work(E->loop, &j->req, drv__job_work, drv__job_after);
  if (rc != 0) {
    free(j);
    return luaL_error(L, "%s: %s", F, uv_strerror(rc));
  }
  u->b = NULL;
  w->job = j;
  w->running++;
  drv__res_link(E, &j->res, drv__job_res_close);
  lua_pushboolean(L, 1);
  return 1;
}

int drv__dbw_wait(lua_State *L, drv_dbw *w) {
  drv_dbjob *j = w ? w->job : NULL;
  int done;
  if (j == NULL) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (j->waiting) return luaL_error(L, "drover.db.wait_batch: another task waits for this batch");
  uv_mutex_lock(&w->mu);
  done = j->done;
  uv_mutex_unlock(&w->mu);
  if (!done && drv__can_wait(L)) {
    drv__wait_init(&j->wait, L);
    j->wait.cancel = drv__job_cancel;
    j->waiting = 1;
    return drv__await(L, &j->wait);
  }
  if (!done) { /* a C-call boundary: the worker needs nothing from the loop */
    uv_mutex_lock(&w->mu);
    while (!j->done) uv_cond_wait(&w->cv, &w->mu);
    uv_mutex_unlock(&w->mu);
  }
  done = drv__job_claim(L, j);
  if (j->after) drv__job_free(j); /* else the after-work callback frees it */
  return done;
}

int drv__dbw_done(drv_dbw *w) {
  int done;
  if (w == NULL || w->job == NULL) return 1;
  uv_mutex_lock(&w->mu);
  done = w->job->done;
  uv_mutex_unlock(&w->mu);
  return done;
}

void drv__dbw_close(drv_dbw *w) {
  if (w == NULL) return;
  w->closed = 1;
  if (w->job && w->job->after) { /* finished, never claimed */
    drv__job_free(w->job);
    w->job = NULL;
  }
  if (w->running == 0) drv__writer_free(w);
}

void drv__dbw_register(lua_State *L) {
  static const luaL_Reg methods[] = {{"run", drv__l_batch_run},
                                     {"run_rows", drv__l_batch_run_rows},
                                     {NULL, NULL}};
  /* the blob metatable (db.c's upvalue 2) is at the top of the stack */
  if (luaL_newmetatable(L, DRV_BATCH_MT)) {
    lua_newtable(L);
    lua_pushnil(L); /* upvalue 1: unused */
    lua_pushvalue(L, -4);
    luaL_setfuncs(L, methods, 2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, drv__l_batch_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, drv__l_batch_len);
    lua_setfield(L, -2, "__len");
  }
  lua_pop(L, 1);
}
