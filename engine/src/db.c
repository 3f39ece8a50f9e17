/*
 * db.c -- drover.db: a small, fast SQLite binding for drover's tracking
 * store (every task run of every workflow is recorded through it, so the
 * per-call cost matters more than breadth).
 *
 *   db = drover.db.open(path, opts)       nil, message on failure
 *   db:exec(sql)                          a script, no parameters
 *   db:run(sql, ...)    -> changes, last_insert_rowid
 *   db:rows(sql, ...)   -> { {col = value, ...}, ... }
 *   db:first(sql, ...)  -> row or nil
 *   db:value(sql, ...)  -> first column of the first row, or nil
 *   db:transaction(fn, ...) -> fn's results (BEGIN IMMEDIATE / SAVEPOINT)
 *
 * Parameters: positional `?` from the varargs (their number must match the
 * statement's), or one table for named `:name` / `@name` / `$name`
 * parameters (a missing key binds NULL; `?` and `?NNN` read t[index]).
 * Values: nil -> NULL, boolean -> 0/1, integer -> INTEGER, float -> REAL,
 * string -> TEXT, drover.db.blob(s) -> BLOB.  Strings are bound as TEXT with
 * their exact length, so embedded zeros and arbitrary bytes round-trip
 * (SQLite does not validate UTF-8 on storage); db.blob() exists for columns
 * that must be typed BLOB.  Both TEXT and BLOB come back as Lua strings; a
 * NULL column is absent from its row table.
 *
 * Speed: statements are prepared once per connection and kept in an LRU
 * cache keyed by their SQL text (a Lua table from the SQL string to a C
 * entry, so a hit on a literal costs one pointer comparison; opts.cache_size,
 * 0 disables it).  Strings are bound SQLITE_STATIC (no copy): the values
 * stay on the Lua stack until the statement is reset, and the bindings are
 * cleared right after, so a statement never keeps a pointer to a string Lua
 * may collect.  The connection is opened SQLITE_OPEN_NOMUTEX: it belongs to
 * the loop thread.  The one exception is db:submit (dbwriter.c): a batch of
 * writes goes to a second connection of the handle's, used by one libuv
 * worker thread at a time, so the tracking store's rows are written beside
 * the loop rather than on it.
 *
 * Blocking and lock waits.  SQLite calls run on the loop thread and block
 * it; for the short statements of the tracking store (a few microseconds)
 * that is cheaper than any hand-off to a thread.  What must not block the
 * loop is waiting for a *lock* held by another process, which can last as
 * long as that process's transaction.  So:
 *
 *   - the busy handler SQLite calls spins only briefly inside SQLite (five
 *     naps, < 1 ms in all) to ride out the common case of another writer
 *     committing right now;
 *   - after that SQLite returns SQLITE_BUSY to us, and when the statement
 *     can safely be retried (no transaction of ours is open, or it is the
 *     COMMIT of db:transaction) the call *waits* through the wait contract:
 *     inside a task the task yields on a libuv timer with backoff (1 ms
 *     growing to 100 ms) and other tasks run; outside any task the loop
 *     runs until the timer fires.  The statement is reset while waiting and
 *     re-bound from the arguments still on the Lua stack, so other tasks
 *     may use the connection (and the same cached statement) meanwhile;
 *   - when busy_timeout ms have passed since the first BUSY, the call
 *     raises "database is locked" naming the file;
 *   - where the caller cannot yield (a coroutine drover does not manage, a
 *     C-call boundary) the same backoff is done with nanosleep: correct,
 *     but it stalls the loop, as sqlite3_busy_timeout would.
 *
 * One connection, many tasks.  A transaction belongs to the connection, so
 * when the task inside db:transaction(fn) yields, another task's statements
 * would silently join (and be rolled back with) its transaction.  To keep
 * tasks apart, db:transaction takes an in-process lock on the handle:
 * statements and transactions from any other thread wait (again through
 * the wait contract) until the owner's transaction ends.  The check is a
 * pointer comparison on every call.  Consequence: work done inside fn must
 * be done by the task that called transaction(), not by tasks it spawns
 * and joins (that would deadlock, and drover reports the deadlock).
 */
#include "drover_int.h"

#include <errno.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DRV_DB_MT "drover.db"
#define DRV_BLOB_MT "drover.db.blob"
#define DRV_DB_CACHE_DEFAULT 64

/* What a call does with the statement's result, and how it reports. */
enum { M_RUN, M_ROWS, M_FIRST, M_VALUE, M_UVGET, M_UVSET, M_EXEC, M_TXBEGIN, M_TXCOMMIT };
static const char *const drv__fname[] = {
    "drover.db.run",          "drover.db.rows",         "drover.db.first",
    "drover.db.value",        "drover.db.user_version", "drover.db.user_version",
    "drover.db.exec",         "drover.db.transaction",  "drover.db.transaction"};

typedef struct drv_stmt drv_stmt;
struct drv_stmt {
  sqlite3_stmt *st;
  drv_stmt *prev, *next; /* LRU list, most recently used first */
  size_t klen;
  char key[];            /* the SQL text, to remove the cache entry */
};

typedef struct drv_txwait drv_txwait;

typedef struct {
  sqlite3 *db;           /* NULL once closed */
  char *path;            /* for messages; freed by __gc only */
  int busy_ms;
  int cache_max, cache_n;
  drv_stmt *lru_head, *lru_tail;
  lua_State *tx_owner;   /* thread inside db:transaction, or NULL */
  int tx_depth;          /* nesting of db:transaction */
  int tx_began;          /* level 1 used BEGIN IMMEDIATE (else a SAVEPOINT) */
  drv_txwait *waiters;   /* threads waiting for the owner's transaction to end */
  lua_Integer prepares, hits;
  int wal, fk;           /* as opened: the writer's connection is set up alike */
  drv_dbw *writer;       /* batches written off the loop (dbwriter.c), or NULL */
} drv_db;

struct drv_txwait {
  drv_wait wait;
  drv_db *d;
  drv_txwait *prev, *next;
};

/* State of a call that met SQLITE_BUSY, kept on the Lua stack across waits. */
typedef struct {
  lua_Integer deadline;  /* uv_hrtime() ns; 0 = no BUSY seen yet */
  lua_Integer attempt;
  lua_Integer offset;    /* exec: where the unfinished statement starts */
  lua_Integer was_auto;  /* exec: the connection was in autocommit at the start */
} drv_busy;
#define DRV_BUSY_SLOTS 4

static int drv__do(lua_State *L, drv_db *d, int mode, drv_busy *bs);
static int drv__exec_do(lua_State *L, drv_db *d, drv_busy *bs);
static int drv__begin_do(lua_State *L, drv_db *d);

/* ---- small helpers --------------------------------------------------------- */

/* Every function of this file is a closure with upvalue 1 = the drover.db
 * metatable and upvalue 2 = the blob metatable: checking a handle is one
 * rawequal, not a registry lookup by name. */
static drv_db *drv__check(lua_State *L, const char *fname) {
  drv_db *d = NULL;
  if (lua_type(L, 1) == LUA_TUSERDATA && lua_getmetatable(L, 1)) {
    if (lua_rawequal(L, -1, lua_upvalueindex(1))) d = (drv_db *)lua_touserdata(L, 1);
    lua_pop(L, 1);
  }
  if (d == NULL) drv__argerror(L, fname, "self", "drover.db", 1);
  return d;
}

int drv__db_isblob(lua_State *L, int idx) {
  int r = 0;
  if (lua_getmetatable(L, idx)) {
    r = lua_rawequal(L, -1, lua_upvalueindex(2));
    lua_pop(L, 1);
  }
  return r;
}

static int drv__closed(lua_State *L, drv_db *d, const char *fname) {
  return luaL_error(L, "%s: database is closed (%s)", fname, d->path ? d->path : "?");
}

static void drv__nap_us(long us) {
  struct timespec ts;
  ts.tv_sec = us / 1000000;
  ts.tv_nsec = (us % 1000000) * 1000;
  while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

/* Short in-SQLite naps before SQLITE_BUSY reaches us (see the top comment). */
static int drv__busy_handler(void *ud, int n) {
  static const long naps_us[] = {20, 50, 100, 200, 500};
  drv_db *d = (drv_db *)ud;
  if (d->busy_ms <= 0 || n >= (int)(sizeof naps_us / sizeof naps_us[0])) return 0;
  drv__nap_us(naps_us[n]);
  return 1;
}

/* ---- the statement cache -------------------------------------------------- */

static void drv__lru_unlink(drv_db *d, drv_stmt *e) {
  if (e->prev) e->prev->next = e->next; else d->lru_head = e->next;
  if (e->next) e->next->prev = e->prev; else d->lru_tail = e->prev;
  e->prev = e->next = NULL;
}

static void drv__lru_push(drv_db *d, drv_stmt *e) {
  e->prev = NULL;
  e->next = d->lru_head;
  if (d->lru_head) d->lru_head->prev = e; else d->lru_tail = e;
  d->lru_head = e;
}

/* Drop least recently used entries beyond the cache size.  db is at 1. */
static void drv__evict(lua_State *L, drv_db *d) {
  if (d->cache_n <= d->cache_max) return;
  lua_getiuservalue(L, 1, 1);
  while (d->cache_n > d->cache_max && d->lru_tail) {
    drv_stmt *e = d->lru_tail;
    drv__lru_unlink(d, e);
    lua_pushlstring(L, e->key, e->klen);
    lua_pushnil(L);
    lua_rawset(L, -3);
    sqlite3_finalize(e->st);
    free(e);
    d->cache_n--;
  }
  lua_pop(L, 1);
}

/* Done with a statement: reset it, drop its bindings (they may point into
 * Lua strings), and shrink the cache back to size. */
static void drv__release(lua_State *L, drv_db *d, drv_stmt *e) {
  sqlite3_reset(e->st);
  sqlite3_clear_bindings(e->st);
  drv__evict(L, d);
}

/* Is the rest of a SQL text only whitespace and comments? */
static int drv__only_comments(sqlite3 *db, const char *p, int n) {
  while (n > 0) {
    sqlite3_stmt *st = NULL;
    const char *tail = NULL;
    int rc = sqlite3_prepare_v2(db, p, n, &st, &tail);
    if (rc != SQLITE_OK || st != NULL) {
      sqlite3_finalize(st);
      return 0;
    }
    if (tail == NULL || tail <= p) return 1;
    n -= (int)(tail - p);
    p = tail;
  }
  return 1;
}

/* The prepared statement for the SQL at index 2, from the cache or newly
 * prepared (and then cached).  On failure returns NULL, sets *rc to the
 * SQLite code (0 for our own checks) and pushes a message. */
static drv_stmt *drv__stmt(lua_State *L, drv_db *d, int *rc) {
  size_t len;
  const char *sql = lua_tolstring(L, 2, &len);
  const char *tail = NULL;
  sqlite3_stmt *st = NULL;
  drv_stmt *e;
  lua_getiuservalue(L, 1, 1);
  lua_pushvalue(L, 2);
  lua_rawget(L, -2);
  e = (drv_stmt *)lua_touserdata(L, -1);
  if (e != NULL) {
    lua_pop(L, 2);
    d->hits++;
    if (e != d->lru_head) {
      drv__lru_unlink(d, e);
      drv__lru_push(d, e);
    }
    /* A Lua error while reading rows (out of memory) can leave it running. */
    if (sqlite3_stmt_busy(e->st)) sqlite3_reset(e->st);
    return e;
  }
  lua_pop(L, 1); /* the nil; the cache table stays at -1 */
  *rc = 0;
  if (len > INT_MAX || memchr(sql, 0, len) != NULL) {
    lua_pop(L, 1);
    lua_pushstring(L, len > INT_MAX ? "SQL text too long" : "SQL text contains a zero byte");
    return NULL;
  }
  *rc = sqlite3_prepare_v3(d->db, sql, (int)len, SQLITE_PREPARE_PERSISTENT, &st, &tail);
  if (*rc != SQLITE_OK) {
    lua_pop(L, 1);
    lua_pushstring(L, sqlite3_errmsg(d->db));
    sqlite3_finalize(st);
    return NULL;
  }
  if (st == NULL) {
    lua_pop(L, 1);
    lua_pushliteral(L, "no SQL statement in the text");
    return NULL;
  }
  if (tail && tail < sql + len && !drv__only_comments(d->db, tail, (int)(sql + len - tail))) {
    sqlite3_finalize(st);
    lua_pop(L, 1);
    lua_pushliteral(L, "more than one SQL statement (db:exec runs scripts)");
    return NULL;
  }
  e = (drv_stmt *)malloc(sizeof *e + len + 1);
  if (e == NULL) {
    sqlite3_finalize(st);
    lua_pop(L, 1);
    lua_pushliteral(L, "out of memory");
    return NULL;
  }
  e->st = st;
  e->klen = len;
  memcpy(e->key, sql, len);
  e->key[len] = '\0';
  drv__lru_push(d, e);
  d->cache_n++;
  d->prepares++;
  lua_pushvalue(L, 2);
  lua_pushlightuserdata(L, e);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  return e;
}

/* ---- the in-process transaction lock -------------------------------------- */

static void drv__txwait_unlink(drv_txwait *t) {
  if (t->prev) t->prev->next = t->next; else t->d->waiters = t->next;
  if (t->next) t->next->prev = t->prev;
  t->prev = t->next = NULL;
}

static void drv__txwait_cancel(drv_wait *w) {
  drv_txwait *t = (drv_txwait *)w;
  drv__txwait_unlink(t);
  drv__wake(&t->wait, 0);
  free(t);
}

/* Wake every waiter: each re-checks the lock when it runs (first woken,
 * first resumed, so the order of arrival is kept). */
static void drv__wake_waiters(drv_db *d, int wake) {
  while (d->waiters) {
    drv_txwait *t = d->waiters;
    drv__txwait_unlink(t);
    if (wake) drv__wake(&t->wait, 0);
    free(t);
  }
}

static void drv__tx_release(drv_db *d) {
  d->tx_owner = NULL;
  d->tx_depth = 0;
  d->tx_began = 0;
  drv__wake_waiters(d, 1);
}

static int drv__lock_wait(lua_State *L, drv_db *d, const char *fname, lua_KFunction k,
                          lua_KContext ctx) {
  drv_txwait *t;
  drv_wait w;
  if (!drv__can_wait(L))
    return luaL_error(L, "%s: the database is inside another task's transaction, and this "
                         "call cannot wait here (a coroutine drover does not manage, or a "
                         "C-call boundary)", fname);
  drv__wait_init(&w, L); /* may raise: before anything is allocated */
  t = (drv_txwait *)calloc(1, sizeof *t);
  if (t == NULL) return luaL_error(L, "%s: out of memory", fname);
  t->wait = w;
  t->wait.cancel = drv__txwait_cancel;
  t->d = d;
  /* append: wake order = arrival order */
  if (d->waiters == NULL) {
    d->waiters = t;
  } else {
    drv_txwait *last = d->waiters;
    while (last->next) last = last->next;
    last->next = t;
    t->prev = last;
  }
  return drv__awaitk(L, &t->wait, k, ctx);
}

static int drv__do_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  return drv__do(L, (drv_db *)lua_touserdata(L, 1), (int)ctx, NULL);
}

static int drv__exec_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  return drv__exec_do(L, (drv_db *)lua_touserdata(L, 1), NULL);
}

/* ---- SQLITE_BUSY: wait and retry ----------------------------------------- */

typedef struct {
  drv_wait wait;
  uv_timer_t timer;
} drv_dbnap;

static void drv__nap_closed(uv_handle_t *h) { free(h->data); }

static void drv__nap_fire(uv_timer_t *h) {
  drv_dbnap *s = (drv_dbnap *)h->data;
  uv_close((uv_handle_t *)h, drv__nap_closed);
  drv__wake(&s->wait, 0);
}

static void drv__nap_cancel(drv_wait *w) {
  drv_dbnap *s = (drv_dbnap *)w;
  uv_timer_stop(&s->timer);
  drv__nap_fire(&s->timer);
}

static int drv__busy_k(lua_State *L, int status, lua_KContext ctx) {
  drv_busy s;
  int top = lua_gettop(L);
  (void)status;
  s.deadline = lua_tointeger(L, top - 3);
  s.attempt = lua_tointeger(L, top - 2);
  s.offset = lua_tointeger(L, top - 1);
  s.was_auto = lua_tointeger(L, top);
  lua_settop(L, top - DRV_BUSY_SLOTS);
  if ((int)ctx == M_EXEC) return drv__exec_do(L, (drv_db *)lua_touserdata(L, 1), &s);
  return drv__do(L, (drv_db *)lua_touserdata(L, 1), (int)ctx, &s);
}

/* Pick the next backoff for a BUSY call.  Returns the delay in ms, or -1
 * once busy_timeout has passed since the first BUSY. */
static long drv__busy_next(drv_db *d, drv_busy *s) {
  static const long backoff_ms[] = {1, 2, 5, 10, 15, 20, 25, 25, 50, 50, 100};
  const int nb = (int)(sizeof backoff_ms / sizeof backoff_ms[0]);
  lua_Integer now = (lua_Integer)uv_hrtime(), left;
  long ms;
  if (s->deadline == 0) s->deadline = now + (lua_Integer)d->busy_ms * 1000000;
  left = (s->deadline - now) / 1000000;
  if (d->busy_ms <= 0 || now >= s->deadline) return -1;
  ms = backoff_ms[s->attempt < nb ? s->attempt : nb - 1];
  if (ms > left) ms = left > 0 ? (long)left : 1;
  s->attempt++;
  return ms;
}

/* Wait ms through the loop; the call resumes in drv__busy_k with s. */
static int drv__busy_wait(lua_State *L, int mode, drv_busy *s, long ms) {
  drv_dbnap *n;
  drv_wait w;
  drv__wait_init(&w, L);
  n = (drv_dbnap *)calloc(1, sizeof *n);
  if (n == NULL) return luaL_error(L, "%s: out of memory", drv__fname[mode]);
  n->wait = w;
  n->wait.cancel = drv__nap_cancel;
  luaL_checkstack(L, DRV_BUSY_SLOTS + 2, "drover.db");
  lua_pushinteger(L, s->deadline);
  lua_pushinteger(L, s->attempt);
  lua_pushinteger(L, s->offset);
  lua_pushinteger(L, s->was_auto);
  uv_timer_init(n->wait.E->loop, &n->timer);
  n->timer.data = n;
  uv_timer_start(&n->timer, drv__nap_fire, (uint64_t)ms, 0);
  return drv__awaitk(L, &n->wait, drv__busy_k, (lua_KContext)mode);
}

/* ---- failing ---------------------------------------------------------------- */

static void drv__rollback_level(drv_db *d, int level) {
  if (level == 1 && d->tx_began) {
    if (!sqlite3_get_autocommit(d->db)) sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
  } else {
    char sql[80];
    snprintf(sql, sizeof sql, "ROLLBACK TO drover_%d; RELEASE drover_%d", level, level);
    sqlite3_exec(d->db, sql, NULL, NULL, NULL);
  }
}

/* Raise "FNAME: message" with the message at the top of the stack, after
 * undoing what the mode left half done. */
static int drv__fail(lua_State *L, drv_db *d, int mode, const drv_busy *s) {
  if (d->db != NULL) {
    if (mode == M_TXBEGIN && d->tx_owner == L && d->tx_depth == 0) {
      drv__tx_release(d);
    } else if (mode == M_TXCOMMIT && d->tx_owner == L) {
      drv__rollback_level(d, 1);
      drv__tx_release(d);
    } else if (mode == M_EXEC && s && s->was_auto && d->tx_depth == 0 &&
               !sqlite3_get_autocommit(d->db)) {
      /* the failed script had opened a transaction: do not leave it open */
      sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
    }
  }
  lua_pushfstring(L, "%s: %s", drv__fname[mode], lua_tostring(L, -1));
  return lua_error(L);
}

static int drv__fail_locked(lua_State *L, drv_db *d, int mode, const drv_busy *s,
                            int retryable) {
  if (retryable)
    lua_pushfstring(L, "database is locked: %s (another connection held the lock for more "
                       "than %d ms)", d->path, d->busy_ms);
  else
    lua_pushfstring(L, "database is locked: %s (inside a transaction: not retried)", d->path);
  return drv__fail(L, d, mode, s);
}

/* ---- binding and reading ------------------------------------------------------ */

/* Bind the value at idx to parameter i.  Returns an SQLite code, or -1 when
 * the Lua type cannot be bound. */
static int drv__bind1(lua_State *L, sqlite3_stmt *st, int i, int idx) {
  switch (lua_type(L, idx)) {
  case LUA_TNIL: return sqlite3_bind_null(st, i);
  case LUA_TBOOLEAN: return sqlite3_bind_int(st, i, lua_toboolean(L, idx));
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) return sqlite3_bind_int64(st, i, lua_tointeger(L, idx));
    return sqlite3_bind_double(st, i, lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return sqlite3_bind_text64(st, i, s, n, SQLITE_STATIC, SQLITE_UTF8);
  }
  case LUA_TUSERDATA:
    if (drv__db_isblob(L, idx)) {
      size_t n = lua_rawlen(L, idx);
      if (n == 0) return sqlite3_bind_zeroblob(st, i, 0);
      return sqlite3_bind_blob64(st, i, lua_touserdata(L, idx), n, SQLITE_STATIC);
    }
    return -1;
  default: return -1;
  }
}

static void drv__push_bind_error(lua_State *L, sqlite3 *db, int rc, int idx, const char *name,
                                 int i) {
  char what[96];
  if (name && name[0] != '?') snprintf(what, sizeof what, "'%s'", name);
  else snprintf(what, sizeof what, "#%d", i);
  if (rc == -1)
    lua_pushfstring(L, "bad parameter %s (nil, boolean, number, string or drover.db.blob "
                       "expected, got %s)", what, luaL_typename(L, idx));
  else
    lua_pushfstring(L, "cannot bind parameter %s: %s", what, sqlite3_errstr(rc));
  (void)db;
}

/* Bind the call's arguments (index 3 on).  Values read from a named table
 * stay on the stack until the statement is reset (they are bound without a
 * copy).  Returns 0, or pushes a message and returns -1. */
static int drv__bind(lua_State *L, sqlite3_stmt *st, int nargs) {
  int np = sqlite3_bind_parameter_count(st), i, rc;
  if (nargs == 1 && lua_type(L, 3) == LUA_TTABLE) {
    luaL_checkstack(L, np + LUA_MINSTACK, "drover.db: too many parameters");
    for (i = 1; i <= np; i++) {
      const char *name = sqlite3_bind_parameter_name(st, i);
      if (name == NULL || name[0] == '?') lua_geti(L, 3, i);
      else lua_getfield(L, 3, name + 1);
      rc = drv__bind1(L, st, i, -1);
      if (rc != SQLITE_OK) {
        drv__push_bind_error(L, sqlite3_db_handle(st), rc, -1, name, i);
        return -1;
      }
    }
    return 0;
  }
  if (nargs != np) {
    lua_pushfstring(L, "wrong number of parameters (the statement has %d, got %d)", np, nargs);
    return -1;
  }
  for (i = 1; i <= np; i++) {
    rc = drv__bind1(L, st, i, 2 + i);
    if (rc != SQLITE_OK) {
      drv__push_bind_error(L, sqlite3_db_handle(st), rc, 2 + i,
                           sqlite3_bind_parameter_name(st, i), i);
      return -1;
    }
  }
  return 0;
}

static void drv__push_col(lua_State *L, sqlite3_stmt *st, int i) {
  switch (sqlite3_column_type(st, i)) {
  case SQLITE_INTEGER: lua_pushinteger(L, (lua_Integer)sqlite3_column_int64(st, i)); break;
  case SQLITE_FLOAT: lua_pushnumber(L, (lua_Number)sqlite3_column_double(st, i)); break;
  case SQLITE_TEXT: {
    const char *s = (const char *)sqlite3_column_text(st, i);
    int n = sqlite3_column_bytes(st, i);
    lua_pushlstring(L, s ? s : "", s ? (size_t)n : 0);
    break;
  }
  case SQLITE_BLOB: {
    const char *b = (const char *)sqlite3_column_blob(st, i);
    int n = sqlite3_column_bytes(st, i);
    lua_pushlstring(L, b ? b : "", b ? (size_t)n : 0);
    break;
  }
  default: lua_pushnil(L); break;
  }
}

/* A row table; the column names are at stack indices names..names+ncol-1. */
static void drv__push_row(lua_State *L, sqlite3_stmt *st, int ncol, int names) {
  int i;
  lua_createtable(L, 0, ncol);
  for (i = 0; i < ncol; i++) {
    if (sqlite3_column_type(st, i) == SQLITE_NULL) continue;
    lua_pushvalue(L, names + i);
    drv__push_col(L, st, i);
    lua_rawset(L, -3);
  }
}

/* ---- running one statement ------------------------------------------------------ */

/*
 * The common path of run/rows/first/value/user_version and of the BEGIN and
 * COMMIT of db:transaction.  Stack: [db, sql, args...].  bs is the BUSY
 * state when resuming after a wait, else NULL.
 */
static int drv__do(lua_State *L, drv_db *d, int mode, drv_busy *bs) {
  drv_busy s;
  drv_stmt *e;
  sqlite3_stmt *st;
  int nargs, rc, ext, rows, ncol = 0, names = 0, retryable, readonly;
  long ms;

  if (bs) s = *bs; else memset(&s, 0, sizeof s);
again:
  if (d->db == NULL) {
    if (mode == M_TXBEGIN || mode == M_TXCOMMIT)
      return luaL_error(L, "%s: database was closed during the transaction (%s)",
                        drv__fname[mode], d->path);
    return drv__closed(L, d, drv__fname[mode]);
  }
  if (d->tx_owner != NULL && d->tx_owner != L)
    return drv__lock_wait(L, d, drv__fname[mode], drv__do_k, (lua_KContext)mode);
  nargs = lua_gettop(L) - 2;
  e = drv__stmt(L, d, &rc);
  if (e == NULL) {
    if ((rc & 0xff) == SQLITE_BUSY && sqlite3_get_autocommit(d->db)) {
      lua_pop(L, 1);
      goto busy;
    }
    return drv__fail(L, d, mode, &s);
  }
  st = e->st;
  if (drv__bind(L, st, nargs) != 0) {
    drv__release(L, d, e);
    return drv__fail(L, d, mode, &s);
  }
  if (mode == M_ROWS || mode == M_FIRST) {
    int i;
    ncol = sqlite3_column_count(st);
    luaL_checkstack(L, ncol + LUA_MINSTACK, "drover.db: too many columns");
    names = lua_gettop(L) + 1;
    for (i = 0; i < ncol; i++) {
      const char *cn = sqlite3_column_name(st, i);
      lua_pushstring(L, cn ? cn : "?");
    }
    if (mode == M_ROWS) lua_newtable(L);
  }
  rows = 0;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    rows++;
    if (mode == M_ROWS) {
      drv__push_row(L, st, ncol, names);
      lua_rawseti(L, -2, rows);
    } else if (mode == M_FIRST) {
      drv__push_row(L, st, ncol, names);
      break;
    } else if (mode == M_VALUE || mode == M_UVGET) {
      drv__push_col(L, st, 0);
      break;
    }
  }
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
    ext = sqlite3_extended_errcode(d->db);
    retryable = (rc & 0xff) == SQLITE_BUSY && rows == 0 && ext != SQLITE_BUSY_SNAPSHOT &&
                (sqlite3_get_autocommit(d->db) || mode == M_TXCOMMIT);
    lua_pushstring(L, sqlite3_errmsg(d->db));
    drv__release(L, d, e);
    if ((rc & 0xff) == SQLITE_BUSY) {
      if (!retryable) return drv__fail_locked(L, d, mode, &s, 0);
      lua_settop(L, 2 + nargs);
      goto busy;
    }
    return drv__fail(L, d, mode, &s);
  }
  readonly = sqlite3_stmt_readonly(st);
  drv__release(L, d, e);
  switch (mode) {
  case M_RUN:
    lua_pushinteger(L, readonly ? 0 : (lua_Integer)sqlite3_changes64(d->db));
    lua_pushinteger(L, (lua_Integer)sqlite3_last_insert_rowid(d->db));
    return 2;
  case M_ROWS: return 1;
  case M_FIRST:
  case M_VALUE:
  case M_UVGET:
    if (rows == 0) lua_pushnil(L);
    return 1;
  case M_TXBEGIN:
    d->tx_depth = 1;
    d->tx_began = 1;
    lua_pushinteger(L, 1);
    return 1;
  case M_TXCOMMIT:
    drv__tx_release(d);
    return 0;
  default: return 0;
  }

busy:
  ms = drv__busy_next(d, &s);
  if (ms < 0) return drv__fail_locked(L, d, mode, &s, 1);
  if (drv__can_wait(L)) return drv__busy_wait(L, mode, &s, ms);
  drv__nap_us(ms * 1000);
  goto again;
}

/* db:exec(sql): every statement of a script, in order, no parameters. */
static int drv__exec_do(lua_State *L, drv_db *d, drv_busy *bs) {
  drv_busy s;
  size_t len;
  const char *sql = lua_tolstring(L, 2, &len);
  long ms;
  if (d->db == NULL) return drv__closed(L, d, "drover.db.exec");
  if (d->tx_owner != NULL && d->tx_owner != L)
    return drv__lock_wait(L, d, "drover.db.exec", drv__exec_k, 0);
  if (bs) {
    s = *bs;
  } else {
    memset(&s, 0, sizeof s);
    s.was_auto = sqlite3_get_autocommit(d->db);
    if (len > INT_MAX || memchr(sql, 0, len) != NULL) {
      lua_pushstring(L, len > INT_MAX ? "SQL text too long" : "SQL text contains a zero byte");
      return drv__fail(L, d, M_EXEC, &s);
    }
  }
  while ((size_t)s.offset < len) {
    const char *p = sql + s.offset, *tail = NULL;
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(d->db, p, (int)(len - (size_t)s.offset), &st, &tail);
    if (rc == SQLITE_OK && st == NULL) break; /* only whitespace and comments left */
    if (rc == SQLITE_OK) {
      while ((rc = sqlite3_step(st)) == SQLITE_ROW) {}
      if (rc == SQLITE_DONE) rc = SQLITE_OK;
    }
    if (rc != SQLITE_OK) {
      int ext = sqlite3_extended_errcode(d->db);
      int retryable = (rc & 0xff) == SQLITE_BUSY && ext != SQLITE_BUSY_SNAPSHOT &&
                      sqlite3_get_autocommit(d->db);
      lua_pushstring(L, sqlite3_errmsg(d->db));
      sqlite3_finalize(st);
      if ((rc & 0xff) != SQLITE_BUSY) return drv__fail(L, d, M_EXEC, &s);
      if (!retryable) return drv__fail_locked(L, d, M_EXEC, &s, 0);
      lua_pop(L, 1);
      ms = drv__busy_next(d, &s);
      if (ms < 0) return drv__fail_locked(L, d, M_EXEC, &s, 1);
      if (drv__can_wait(L)) return drv__busy_wait(L, M_EXEC, &s, ms);
      drv__nap_us(ms * 1000);
      continue; /* the same statement again */
    }
    sqlite3_finalize(st);
    if (tail == NULL || tail <= p) break;
    s.offset = (lua_Integer)(tail - sql);
  }
  return 0;
}

/* ---- Lua API: statements ------------------------------------------------------------ */

static int drv__stmt_entry(lua_State *L, int mode) {
  drv_db *d = drv__check(L, drv__fname[mode]);
  if (lua_type(L, 2) != LUA_TSTRING) return drv__argerror(L, drv__fname[mode], "sql", "string", 2);
  return drv__do(L, d, mode, NULL);
}

static int drv__l_run(lua_State *L) { return drv__stmt_entry(L, M_RUN); }
static int drv__l_rows(lua_State *L) { return drv__stmt_entry(L, M_ROWS); }
static int drv__l_first(lua_State *L) { return drv__stmt_entry(L, M_FIRST); }
static int drv__l_value(lua_State *L) { return drv__stmt_entry(L, M_VALUE); }

static int drv__l_exec(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.exec");
  if (lua_type(L, 2) != LUA_TSTRING) return drv__argerror(L, "drover.db.exec", "sql", "string", 2);
  if (lua_gettop(L) > 2)
    return luaL_error(L, "drover.db.exec: takes no parameters (db:run binds parameters)");
  return drv__exec_do(L, d, NULL);
}

/* db:user_version() -> n; db:user_version(n) sets it. */
static int drv__l_user_version(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.user_version");
  lua_Integer n;
  int isnum;
  if (lua_isnoneornil(L, 2)) {
    lua_settop(L, 1);
    lua_pushliteral(L, "PRAGMA user_version");
    return drv__do(L, d, M_UVGET, NULL);
  }
  n = lua_tointegerx(L, 2, &isnum);
  if (!isnum || lua_type(L, 2) != LUA_TNUMBER)
    return drv__argerror(L, "drover.db.user_version", "n", "integer", 2);
  if (n < INT32_MIN || n > INT32_MAX)
    return luaL_error(L, "drover.db.user_version: bad argument 'n' (out of 32-bit range)");
  lua_settop(L, 1);
  lua_pushfstring(L, "PRAGMA user_version = %d", (int)n);
  return drv__do(L, d, M_UVSET, NULL);
}

static int drv__l_changes(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.changes");
  if (d->db == NULL) return drv__closed(L, d, "drover.db.changes");
  lua_pushinteger(L, (lua_Integer)sqlite3_changes64(d->db));
  return 1;
}

static int drv__l_last_insert_rowid(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.last_insert_rowid");
  if (d->db == NULL) return drv__closed(L, d, "drover.db.last_insert_rowid");
  lua_pushinteger(L, (lua_Integer)sqlite3_last_insert_rowid(d->db));
  return 1;
}

/* db:stats() -> {prepares, hits, cached, cache_size}: to see the cache work. */
static int drv__l_stats(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.stats");
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, d->prepares);
  lua_setfield(L, -2, "prepares");
  lua_pushinteger(L, d->hits);
  lua_setfield(L, -2, "hits");
  lua_pushinteger(L, d->cache_n);
  lua_setfield(L, -2, "cached");
  lua_pushinteger(L, d->cache_max);
  lua_setfield(L, -2, "cache_size");
  lua_pushboolean(L, d->tx_depth > 0);
  lua_setfield(L, -2, "in_transaction");
  return 1;
}

static int drv__l_isopen(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.isopen");
  lua_pushboolean(L, d->db != NULL);
  return 1;
}

static int drv__l_path(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.path");
  lua_pushstring(L, d->path);
  return 1;
}

/* ---- closing ------------------------------------------------------------------------- */

/* Finalize every statement, close the connection (SQLite rolls back an
 * open transaction), and let waiters see the handle closed.  In __gc the
 * waiters are not woken: a thread waiting on this handle keeps it alive, so
 * __gc with waiters only happens while the whole state is being closed. */
static void drv__close(drv_db *d, int wake) {
  while (d->lru_head) {
    drv_stmt *e = d->lru_head;
    drv__lru_unlink(d, e);
    sqlite3_finalize(e->st);
    free(e);
  }
  d->cache_n = 0;
  drv__dbw_close(d->writer); /* a batch being written finishes first, on its thread */
  d->writer = NULL;
  if (d->db) sqlite3_close_v2(d->db);
  d->db = NULL;
  d->tx_owner = NULL;
  d->tx_depth = 0;
  d->tx_began = 0;
  drv__wake_waiters(d, wake);
}

static int drv__l_close(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.close");
  if (d->db == NULL) return 0;
  drv__close(d, 1);
  lua_pushnil(L);
  lua_setiuservalue(L, 1, 1); /* the cache table held pointers to freed entries */
  return 0;
}

static int drv__l_gc(lua_State *L) {
  drv_db *d = (drv_db *)lua_touserdata(L, 1);
  drv__close(d, 0);
  free(d->path);
  d->path = NULL;
  return 0;
}

static int drv__l_tostring(lua_State *L) {
  drv_db *d = (drv_db *)lua_touserdata(L, 1);
  lua_pushfstring(L, "drover.db(%s%s)", d->path ? d->path : "?", d->db ? "" : ", closed");
  return 1;
}

/* ---- transactions ------------------------------------------------------------------- */

/* begin(db, fn) -> level.  Takes the handle's lock (waiting for another
 * thread's transaction to end), then BEGIN IMMEDIATE at level 1 or a
 * SAVEPOINT when nested (or inside a transaction opened by hand). */
static int drv__begin_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  return drv__begin_do(L, (drv_db *)lua_touserdata(L, 1));
}

static int drv__begin_do(lua_State *L, drv_db *d) {
  if (d->db == NULL) return drv__closed(L, d, "drover.db.transaction");
  if (d->tx_owner != NULL && d->tx_owner != L)
    return drv__lock_wait(L, d, "drover.db.transaction", drv__begin_k, 0);
  d->tx_owner = L;
  if (d->tx_depth == 0 && sqlite3_get_autocommit(d->db)) {
    lua_settop(L, 1);
    lua_pushliteral(L, "BEGIN IMMEDIATE");
    return drv__do(L, d, M_TXBEGIN, NULL);
  } else {
    char sql[48];
    int level = d->tx_depth + 1;
    snprintf(sql, sizeof sql, "SAVEPOINT drover_%d", level);
    if (sqlite3_exec(d->db, sql, NULL, NULL, NULL) != SQLITE_OK) {
      lua_pushstring(L, sqlite3_errmsg(d->db));
      return drv__fail(L, d, M_TXBEGIN, NULL);
    }
    d->tx_depth = level;
    lua_pushinteger(L, level);
    return 1;
  }
}

static int drv__l_begin(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.transaction");
  if (lua_type(L, 2) != LUA_TFUNCTION && !luaL_getmetafield(L, 2, "__call"))
    return drv__argerror(L, "drover.db.transaction", "fn", "function", 2);
  lua_settop(L, 1);
  return drv__begin_do(L, d);
}

/* finish(db, ok, level): COMMIT / RELEASE when fn succeeded, else roll the
 * level back.  A failed COMMIT rolls back and raises. */
static int drv__l_finish(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.transaction");
  int ok = lua_toboolean(L, 2);
  int level = (int)lua_tointeger(L, 3);
  if (d->db == NULL) {
    if (ok) return luaL_error(L, "drover.db.transaction: database was closed during the "
                                 "transaction (%s)", d->path);
    return 0;
  }
  if (d->tx_owner != L || d->tx_depth != level)
    return luaL_error(L, "drover.db.transaction: transaction state changed inside fn "
                         "(a COMMIT or ROLLBACK run by hand?)");
  if (!ok) {
    drv__rollback_level(d, level);
    if (--d->tx_depth == 0) drv__tx_release(d);
    return 0;
  }
  if (level == 1 && d->tx_began) {
    lua_settop(L, 1);
    lua_pushliteral(L, "COMMIT");
    return drv__do(L, d, M_TXCOMMIT, NULL);
  } else {
    char sql[48];
    snprintf(sql, sizeof sql, "RELEASE drover_%d", level);
    if (sqlite3_exec(d->db, sql, NULL, NULL, NULL) != SQLITE_OK) {
      lua_pushfstring(L, "drover.db.transaction: %s", sqlite3_errmsg(d->db));
      drv__rollback_level(d, level);
      if (--d->tx_depth == 0) drv__tx_release(d);
      return lua_error(L);
    }
    if (--d->tx_depth == 0) drv__tx_release(d);
    return 0;
  }
}

/* abort(db, level): begin or finish was interrupted (cancelled while
 * waiting): undo what it left.  Never raises. */
static int drv__l_abort(lua_State *L) {
  drv_db *d = NULL;
  /* db is whatever the caller passed to transaction(): check, never raise */
  if (lua_type(L, 1) == LUA_TUSERDATA && lua_getmetatable(L, 1)) {
    if (lua_rawequal(L, -1, lua_upvalueindex(1))) d = (drv_db *)lua_touserdata(L, 1);
    lua_pop(L, 1);
  }
  if (d == NULL || d->db == NULL || d->tx_owner != L) return 0;
  if (lua_isnil(L, 2)) {
    if (d->tx_depth == 0) drv__tx_release(d);
  } else if (d->tx_depth == (int)lua_tointeger(L, 2)) {
    drv__rollback_level(d, d->tx_depth);
    if (--d->tx_depth == 0) drv__tx_release(d);
  }
  return 0;
}

/* The control flow of db:transaction is Lua: pcall is the natural way to
 * run fn (which may yield) and catch its error.  Errors are re-raised as
 * they were (level 0: no position added). */
static const char drv__tx_lua[] =
    "local begin, finish, abort = ...\n"
    "local pcall, error, pack, unpack = pcall, error, table.pack, table.unpack\n"
    "return function(db, fn, ...)\n"
    "  local ok, level = pcall(begin, db, fn)\n"
    "  if not ok then abort(db, nil); error(level, 0) end\n"
    "  local r = pack(pcall(fn, db, ...))\n"
    "  local fok, ferr = pcall(finish, db, r[1], level)\n"
    "  if not fok then abort(db, level); error(ferr, 0) end\n"
    "  if r[1] then return unpack(r, 2, r.n) end\n"
    "  error(r[2], 0)\n"
    "end\n";

/* ---- opening ------------------------------------------------------------------------- */

static int drv__open_fail(lua_State *L, drv_db *d, const char *path, const char *msg) {
  lua_pushnil(L);
  lua_pushfstring(L, "drover.db.open: %s: %s", path, msg);
  if (d->db) {
    sqlite3_close_v2(d->db);
    d->db = NULL;
  }
  return 2;
}

/* sqlite3_exec callback: the first column of a one-row count query. */
static int drv__count_row(void *out, int ncol, char **vals, char **names) {
  (void)names;
  if (ncol > 0 && vals[0]) *(int *)out = atoi(vals[0]);
  return 0;
}

/* drover.db.open(path, opts) -> db, or nil, message */
static int drv__l_open(lua_State *L) {
  static const char *F = "drover.db.open";
  static const char *const keys[] = {"readonly",   "create",     "wal",         "foreign_keys",
                                     "busy_timeout", "cache_size", "auto_vacuum", NULL};
  static const char *const vacuum_modes[] = {"none", "full", "incremental", NULL};
  size_t plen;
  const char *path, *vacuum;
  int tables = -1;
  int readonly, wal, fk, create, flags, rc;
  double busy, cache;
  drv_db *d;
  if (lua_type(L, 1) != LUA_TSTRING) return drv__argerror(L, F, "path", "string", 1);
  path = lua_tolstring(L, 1, &plen);
  if (strlen(path) != plen) return luaL_error(L, "%s: bad argument 'path' (contains a zero byte)", F);
  if (!lua_isnoneornil(L, 2) && lua_type(L, 2) != LUA_TTABLE)
    return drv__argerror(L, F, "opts", "table", 2);
  drv__opt_known(L, 2, F, keys);
  readonly = drv__opt_bool(L, 2, F, "readonly", 0);
  wal = drv__opt_bool(L, 2, F, "wal", 1);
  fk = drv__opt_bool(L, 2, F, "foreign_keys", 1);
  create = drv__opt_bool(L, 2, F, "create", 1);
  busy = drv__opt_number(L, 2, F, "busy_timeout", 5000);
  cache = drv__opt_number(L, 2, F, "cache_size", DRV_DB_CACHE_DEFAULT);
  vacuum = drv__opt_string(L, 2, F, "auto_vacuum", NULL);
  if (vacuum) {
    int i, ok = 0;
    for (i = 0; vacuum_modes[i]; i++) ok |= strcmp(vacuum, vacuum_modes[i]) == 0;
    if (!ok)
      return luaL_error(L, "%s: bad option 'auto_vacuum' (\"none\", \"full\" or \"incremental\", got \"%s\")",
                        F, vacuum);
  }
  if (!(busy >= 0 && busy <= 24.0 * 3600 * 1000))
    return luaL_error(L, "%s: bad option 'busy_timeout' (milliseconds, 0 to 86400000)", F);
  if (!(cache >= 0 && cache <= 100000))
    return luaL_error(L, "%s: bad option 'cache_size' (0 to 100000 statements)", F);

  d = (drv_db *)lua_newuserdatauv(L, sizeof *d, 1);
  memset(d, 0, sizeof *d);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_setmetatable(L, -2);
  d->path = strdup(path);
  if (d->path == NULL) return luaL_error(L, "%s: out of memory", F);
  d->busy_ms = (int)busy;
  d->cache_max = (int)cache;
  d->wal = wal && !readonly;
  d->fk = fk;
  lua_newtable(L);
  lua_setiuservalue(L, -2, 1);

  flags = SQLITE_OPEN_NOMUTEX |
          (readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0));
  rc = sqlite3_open_v2(path, &d->db, flags, NULL);
  if (rc != SQLITE_OK) {
    const char *msg = d->db ? sqlite3_errmsg(d->db) : sqlite3_errstr(rc);
    lua_pushstring(L, msg);
    return drv__open_fail(L, d, path, lua_tostring(L, -1));
  }
  /* Setup runs once and may meet another process creating the same file:
   * SQLite's own blocking busy_timeout is fine here. */
  sqlite3_busy_timeout(d->db, d->busy_ms);
  /* Reading the schema proves the file is a database (SQLite opens lazily). */
  rc = sqlite3_exec(d->db, "SELECT count(*) FROM sqlite_schema", drv__count_row, &tables, NULL);
  /* auto_vacuum is set before journal_mode=WAL: that pragma writes the
   * file's first page, after which SQLite changes the mode only with a
   * VACUUM (a rewrite of the whole file).  A database that has tables keeps
   * its mode: changing it is a VACUUM the caller asks for. */
  if (rc == SQLITE_OK && vacuum && tables == 0 && !readonly) {
    char sql[48];
    snprintf(sql, sizeof sql, "PRAGMA auto_vacuum=%s", vacuum);
    rc = sqlite3_exec(d->db, sql, NULL, NULL, NULL);
  }
  if (rc == SQLITE_OK && !readonly && wal)
    rc = sqlite3_exec(d->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL", NULL, NULL, NULL);
  if (rc == SQLITE_OK)
    rc = sqlite3_exec(d->db, fk ? "PRAGMA foreign_keys=ON" : "PRAGMA foreign_keys=OFF", NULL,
                      NULL, NULL);
  if (rc != SQLITE_OK) {
    lua_pushstring(L, sqlite3_errmsg(d->db));
    return drv__open_fail(L, d, path, lua_tostring(L, -1));
  }
  sqlite3_busy_handler(d->db, drv__busy_handler, d);
  return 1;
}

/* db:submit(batch) -> true | false, message: write it in one transaction
 * on the handle's writer (dbwriter.c), without waiting. */
static int drv__l_submit(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.submit");
  if (d->db == NULL) return drv__closed(L, d, "drover.db.submit");
  if (sqlite3_db_readonly(d->db, "main") == 1)
    return luaL_error(L, "drover.db.submit: %s is open read-only", d->path);
  return drv__dbw_submit(L, &d->writer, d->path, d->busy_ms, d->fk, d->wal, 2);
}

/* db:wait_batch() -> true | false, message */
static int drv__l_wait_batch(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.wait_batch");
  return drv__dbw_wait(L, d->writer);
}

/* db:batch_done() -> boolean */
static int drv__l_batch_done(lua_State *L) {
  drv_db *d = drv__check(L, "drover.db.batch_done");
  lua_pushboolean(L, drv__dbw_done(d->writer));
  return 1;
}

/* drover.db.blob(s) -> a value that binds as BLOB. */
static int drv__l_blob(lua_State *L) {
  size_t n;
  const char *s;
  void *p;
  if (lua_type(L, 1) != LUA_TSTRING) return drv__argerror(L, "drover.db.blob", "s", "string", 1);
  s = lua_tolstring(L, 1, &n);
  p = lua_newuserdatauv(L, n, 0);
  if (n) memcpy(p, s, n);
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_setmetatable(L, -2);
  return 1;
}

static int drv__l_blob_tostring(lua_State *L) {
  lua_pushlstring(L, (const char *)lua_touserdata(L, 1), lua_rawlen(L, 1));
  return 1;
}

static int drv__l_blob_len(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)lua_rawlen(L, 1));
  return 1;
}

int drv__open_db(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"exec", drv__l_exec},
      {"run", drv__l_run},
      {"rows", drv__l_rows},
      {"first", drv__l_first},
      {"value", drv__l_value},
      {"close", drv__l_close},
      {"changes", drv__l_changes},
      {"last_insert_rowid", drv__l_last_insert_rowid},
      {"user_version", drv__l_user_version},
      {"stats", drv__l_stats},
      {"isopen", drv__l_isopen},
      {"path", drv__l_path},
      {"submit", drv__l_submit},
      {"wait_batch", drv__l_wait_batch},
      {"batch_done", drv__l_batch_done},
      {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__gc", drv__l_gc},
                                  {"__close", drv__l_close},
                                  {"__tostring", drv__l_tostring},
                                  {NULL, NULL}};
  static const luaL_Reg blobmeta[] = {{"__tostring", drv__l_blob_tostring},
                                      {"__len", drv__l_blob_len},
                                      {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"open", drv__l_open}, {"blob", drv__l_blob},
                                   {"batch", drv__dbw_new_batch}, {NULL, NULL}};
  static const luaL_Reg txfuncs[] = {{"begin", drv__l_begin}, {"finish", drv__l_finish},
                                     {"abort", drv__l_abort}, {NULL, NULL}};
  int mod = lua_gettop(L), mt, bmt, methods_idx, tx;

  luaL_newmetatable(L, DRV_DB_MT);
  mt = lua_gettop(L);
  luaL_newmetatable(L, DRV_BLOB_MT);
  bmt = lua_gettop(L);

/* register list l into the table at idx, each a closure over (mt, bmt) */
#define DRV_SETFUNCS(idx, l)                                                    \
  do {                                                                          \
    lua_pushvalue(L, (idx));                                                    \
    lua_pushvalue(L, mt);                                                       \
    lua_pushvalue(L, bmt);                                                      \
    luaL_setfuncs(L, (l), 2);                                                   \
    lua_pop(L, 1);                                                              \
  } while (0)

  DRV_SETFUNCS(bmt, blobmeta);
  drv__dbw_register(L); /* the batch metatable; reads the blob metatable at the top */
  DRV_SETFUNCS(mt, meta);
  lua_newtable(L);
  methods_idx = lua_gettop(L);
  DRV_SETFUNCS(methods_idx, methods);
  DRV_SETFUNCS(mod, funcs);

  /* db:transaction: the Lua chunk above, given begin/finish/abort. */
  if (luaL_loadbuffer(L, drv__tx_lua, sizeof drv__tx_lua - 1, "=drover.db.transaction") != LUA_OK)
    return lua_error(L);
  lua_newtable(L);
  tx = lua_gettop(L);
  DRV_SETFUNCS(tx, txfuncs);
  lua_getfield(L, tx, "begin");
  lua_getfield(L, tx, "finish");
  lua_getfield(L, tx, "abort");
  lua_remove(L, tx);
  lua_call(L, 3, 1);
  lua_setfield(L, methods_idx, "transaction");
#undef DRV_SETFUNCS

  lua_pushvalue(L, methods_idx);
  lua_setfield(L, mt, "__index");
  lua_pushvalue(L, methods_idx);
  lua_setfield(L, mod, "methods"); /* so drover/db.lua can add Lua methods */
  lua_settop(L, mod);
  return 0;
}
