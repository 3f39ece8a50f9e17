/*
 * pg.c -- drover.pg: one PostgreSQL connection on the loop, through
 * libpq's asynchronous API (lua/drover/pg.lua adds the pool and
 * transactions on top).
 *
 *   c = core.pg.connect(conninfo, opts)   nil, message on failure
 *   c:rows(sql, ...)   -> { {col = value, ...}, ... }     or nil, message
 *   c:first(sql, ...)  -> row or nil                        or nil, message
 *   c:value(sql, ...)  -> first column of the first row     or nil, message
 *   c:run(sql, ...)    -> affected rows                     or nil, message
 *   c:exec(script)     -> true (several statements, no parameters) or nil, message
 *   c:close(), c:isopen(), c:stats(), c:backend_pid(), c:label(), c:txstatus()
 *
 * Nothing blocks the loop.  Connecting is PQconnectStart + PQconnectPoll,
 * a query is PQsendPrepare / PQsendQueryPrepared (or PQsendQueryParams)
 * then PQconsumeInput / PQisBusy / PQgetResult, each step driven by a
 * uv_poll_t on the connection's socket.  The calling task waits through
 * the wait contract (drv__awaitk); outside a task the loop runs until the
 * result is in.  Between queries the socket stays watched for reading, so
 * that a server that ends the session (pg_terminate_backend, a restart)
 * is noticed at once and the connection marked broken.
 *
 * One query at a time per connection: a call that finds it busy, or inside
 * another task's transaction (c:_enter, used by pg.lua's transaction), waits
 * in a FIFO queue.  The result is read in the caller's own continuation,
 * never in a libuv callback.
 *
 * Parameters are always bound ($1, $2...; varargs, nil and json.null are
 * NULL), in text format, except booleans (typed bool) and pg.bytea(s) and
 * strings holding a zero byte (binary, for bytea columns).  Statements are
 * prepared once per connection and cached by their SQL text (opts.cache_size,
 * default 64; beyond it, statements run unnamed); a statement's parameter
 * types are fixed when it is first prepared, as in PostgreSQL itself.
 *
 * Reconnecting: a call that finds the connection broken before sending
 * reconnects (once) and sends; a query the server may have received is never
 * sent again (its failure is returned), and nothing reconnects inside a
 * transaction.  So after a restart or a pg_terminate_backend, the next call
 * works; the one in flight at that moment fails.
 *
 * libpq is dlopen()ed on first use (as libcurl is, lazylib.h): the drover
 * binary does not depend on it unless drover.pg is used.
 */
#include "drover_int.h"
#include "lazylib.h"

#include <errno.h>
#include <libpq-fe.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DRV_PG_MT "drover.pg"
#define DRV_BYTEA_MT "drover.pg.bytea"
#define DRV_PG_CACHE_DEFAULT 64

/* Type OIDs (pg_type.h; stable across PostgreSQL versions). */
#define OID_BOOL 16
#define OID_BYTEA 17
#define OID_INT8 20
#define OID_INT2 21
#define OID_INT4 23
#define OID_OID 26
#define OID_FLOAT4 700
#define OID_FLOAT8 701
#define OID_NUMERIC 1700

/* ---- libpq, loaded on first use ---------------------------------------------- */

static struct {
  PGconn *(*connectStart)(const char *);
  PostgresPollingStatusType (*connectPoll)(PGconn *);
  ConnStatusType (*status)(const PGconn *);
  PGTransactionStatusType (*transactionStatus)(const PGconn *);
  char *(*errorMessage)(const PGconn *);
  int (*socket)(const PGconn *);
  int (*backendPID)(const PGconn *);
  void (*finish)(PGconn *);
  int (*setnonblocking)(PGconn *, int);
  PQnoticeReceiver (*setNoticeReceiver)(PGconn *, PQnoticeReceiver, void *);
  int (*sendQueryParams)(PGconn *, const char *, int, const Oid *, const char *const *,
                         const int *, const int *, int);
  int (*sendQuery)(PGconn *, const char *);
  int (*sendPrepare)(PGconn *, const char *, const char *, int, const Oid *);
  int (*sendQueryPrepared)(PGconn *, const char *, int, const char *const *, const int *,
                           const int *, int);
  int (*flush)(PGconn *);
  int (*consumeInput)(PGconn *);
  int (*isBusy)(PGconn *);
  PGresult *(*getResult)(PGconn *);
  PGnotify *(*notifies)(PGconn *);
  ExecStatusType (*resultStatus)(const PGresult *);
  char *(*resultErrorField)(const PGresult *, int);
  char *(*resultErrorMessage)(const PGresult *);
  void (*clear)(PGresult *);
  int (*ntuples)(const PGresult *);
  int (*nfields)(const PGresult *);
  char *(*fname)(const PGresult *, int);
  Oid (*ftype)(const PGresult *, int);
  char *(*getvalue)(const PGresult *, int, int);
  int (*getlength)(const PGresult *, int, int);
  int (*getisnull)(const PGresult *, int, int);
  char *(*cmdTuples)(PGresult *);
  unsigned char *(*unescapeBytea)(const unsigned char *, size_t *);
  void (*freemem)(void *);
  PGcancel *(*getCancel)(PGconn *);
  int (*cancel)(PGcancel *, char *, int);
  void (*freeCancel)(PGcancel *);
  char *(*host)(const PGconn *);
  char *(*port)(const PGconn *);
  char *(*db)(const PGconn *);
  char *(*user)(const PGconn *);
} pq;

static const char *drv__pq_load(void) {
  static int loaded;
  static char err[512];
#define S(field, name) {name, (void **)&pq.field}
  static const drv_sym syms[] = {
      S(connectStart, "PQconnectStart"),   S(connectPoll, "PQconnectPoll"),
      S(status, "PQstatus"),               S(errorMessage, "PQerrorMessage"),
      S(transactionStatus, "PQtransactionStatus"),
      S(socket, "PQsocket"),               S(backendPID, "PQbackendPID"),
      S(finish, "PQfinish"),               S(setnonblocking, "PQsetnonblocking"),
      S(setNoticeReceiver, "PQsetNoticeReceiver"),
      S(sendQueryParams, "PQsendQueryParams"),
      S(sendQuery, "PQsendQuery"),         S(sendPrepare, "PQsendPrepare"),     S(sendQueryPrepared, "PQsendQueryPrepared"),
      S(flush, "PQflush"),                 S(consumeInput, "PQconsumeInput"),
      S(isBusy, "PQisBusy"),               S(getResult, "PQgetResult"),
      S(notifies, "PQnotifies"),           S(resultStatus, "PQresultStatus"),
      S(resultErrorField, "PQresultErrorField"),
      S(resultErrorMessage, "PQresultErrorMessage"),
      S(clear, "PQclear"),                 S(ntuples, "PQntuples"),
      S(nfields, "PQnfields"),             S(fname, "PQfname"),
      S(ftype, "PQftype"),                 S(getvalue, "PQgetvalue"),
      S(getlength, "PQgetlength"),         S(getisnull, "PQgetisnull"),
      S(cmdTuples, "PQcmdTuples"),         S(unescapeBytea, "PQunescapeBytea"),
      S(freemem, "PQfreemem"),             S(getCancel, "PQgetCancel"),
      S(cancel, "PQcancel"),               S(freeCancel, "PQfreeCancel"),
      S(host, "PQhost"),                   S(port, "PQport"),
      S(db, "PQdb"),                       S(user, "PQuser"),
      {NULL, NULL}};
#undef S
  return drv__dl_load("libpq.so.5", syms, &loaded, err, sizeof err);
}

/* ---- the connection ------------------------------------------------------------ */

enum { OP_NONE, OP_CONNECT, OP_PREPARE, OP_QUERY };
/* Modes of a query call, and the steps its continuation resumes at. */
enum { M_ROWS, M_FIRST, M_VALUE, M_RUN, M_EXEC, M_ENTER };
enum { ST_START, ST_CONNECTED, ST_PREPARED, ST_RESULT };
#define KCTX(mode, step) ((lua_KContext)((mode) | ((step) << 4)))

static const char *const drv__fname[] = {"drover.pg.rows", "drover.pg.first",
                                         "drover.pg.value", "drover.pg.run",
                                         "drover.pg.exec", "drover.pg.transaction"};

typedef struct drv_pgc drv_pgc;

typedef struct drv_pgq {
  drv_wait wait;
  drv_pgc *c;
  struct drv_pgq *prev, *next;
} drv_pgq;

struct drv_pgc {
  drv_res res;            /* first: closed with the engine */
  drv_engine *E;
  PGconn *pg;             /* NULL once closed */
  char *conninfo;         /* as given (may hold the password): only for PQconnectStart */
  char label[256];        /* user@host:port/db, for messages: never the password */
  uv_poll_t *poll;        /* on PQsocket(pg); NULL when not watching */
  uv_timer_t *timer;      /* connect timeout */
  double connect_timeout; /* seconds */
  int handles;            /* handles being closed (their callbacks free them) */
  int closed, lua_gone;
  /* the operation in flight, owned by the call that set busy */
  int op, busy;
  drv_wait wait;          /* the owner waits here ... */
  int waiting;            /* ... while this is set (cleared by a cancel) */
  PGresult *res_ok, *res_err;
  char *errmsg;           /* connect failure or connection loss, malloc'd */
  int retried;            /* this call reconnected already */
  int ended;              /* the server said FATAL: the session is over */
  int stale_cache;        /* reconnected: the server forgot our statements */
  const char *pending_name; /* statement being prepared (in the cache table) */
  drv_pgq *q_head, *q_tail;
  lua_State *tx_owner;
  int tx_depth;
  int cache_max, cache_n;
  unsigned long next_stmt;
  lua_Integer prepares, hits, reconnects, queries;
};

typedef struct {
  drv_pgc *c;
} drv_pgud;

static void drv__watch(drv_pgc *c, int events);
static void drv__unwatch(drv_pgc *c);
static int drv__q(lua_State *L, drv_pgc *c, int mode, int step);

static void drv__maybe_free(drv_pgc *c) {
  if (!c->lua_gone || !c->closed || c->handles > 0) return;
  free(c->conninfo);
  free(c);
}

static void drv__handle_closed(uv_handle_t *h) {
  drv_pgc *c = (drv_pgc *)h->data;
  free(h);
  c->handles--;
  drv__maybe_free(c);
}

static void drv__clear_results(drv_pgc *c) {
  if (c->res_ok) pq.clear(c->res_ok);
  if (c->res_err) pq.clear(c->res_err);
  c->res_ok = c->res_err = NULL;
  free(c->errmsg);
  c->errmsg = NULL;
}

/* Where the password sits in a conninfo string, if it has one: the
 * userinfo of a postgresql:// URL, or a password=... keyword. */
static const char *drv__password_span(const char *ci, size_t *len) {
  const char *p = strstr(ci, "://");
  *len = 0;
  if (p != NULL && strspn(ci, "abcdefghijklmnopqrstuvwxyz") == (size_t)(p - ci)) {
    const char *end = p + 3 + strcspn(p + 3, "/?"), *at = NULL, *colon, *q;
    for (q = p + 3; q < end; q++)
      if (*q == '@') at = q;
    if (at == NULL) return NULL;
    colon = memchr(p + 3, ':', (size_t)(at - (p + 3)));
    if (colon == NULL) return NULL;
    *len = (size_t)(at - colon - 1);
    return colon + 1;
  }
  for (p = strstr(ci, "password"); p; p = strstr(p + 1, "password")) {
    const char *v = p + 8;
    if (p > ci && !(p[-1] == ' ' || p[-1] == '\t' || p[-1] == '\n')) continue;
    v += strspn(v, " \t\n");
    if (*v != '=') continue;
    v++;
    v += strspn(v, " \t\n");
    if (*v == '\'') {
      const char *e = v + 1;
      while (*e && *e != '\'') e += (*e == '\\' && e[1]) ? 2 : 1;
      *len = (size_t)(e - v - 1);
      return v + 1;
    }
    *len = strcspn(v, " \t\n");
    return v;
  }
  return NULL;
}

/* libpq's messages end in newlines and sometimes span lines: one line, and
 * never the password (libpq quotes a bad token of the connection string,
 * which may be the password itself). */
static char *drv__oneline(drv_pgc *c, const char *msg) {
  size_t n = strlen(msg), i, j = 0, plen = 0;
  const char *pw = c->conninfo ? drv__password_span(c->conninfo, &plen) : NULL;
  char *s = (char *)malloc(n + 1);
  if (s == NULL) return NULL;
  for (i = 0; i < n; i++) {
    char ch = msg[i];
    if (pw && plen >= 3 && strncmp(msg + i, pw, plen) == 0) {
      memcpy(s + j, "***", 3); /* plen >= 3: fits where the password was */
      j += 3;
      i += plen - 1;
      continue;
    }
    if (ch == '\n' || ch == '\t' || ch == '\r') ch = ' ';
    if (ch == ' ' && (j == 0 || s[j - 1] == ' ')) continue;
    s[j++] = ch;
  }
  while (j > 0 && s[j - 1] == ' ') j--;
  s[j] = '\0';
  return s;
}

static void drv__set_err(drv_pgc *c, const char *what) {
  char *line = drv__oneline(c, c->pg ? pq.errorMessage(c->pg) : "");
  size_t n = strlen(what) + (line ? strlen(line) : 0) + 4;
  free(c->errmsg);
  c->errmsg = (char *)malloc(n);
  if (c->errmsg)
    snprintf(c->errmsg, n, "%s%s%s", what, *what && line && *line ? ": " : "", line ? line : "");
  free(line);
}

/* NOTICEs, and the FATAL a server sends before it ends an idle session
 * (libpq hands an error that answers no query to the notice receiver, and
 * would print it on stderr).  A FATAL means the session is over even if
 * the socket has not closed yet: note it, so that nothing is sent on it. */
static void drv__notice(void *arg, const PGresult *res) {
  drv_pgc *c = (drv_pgc *)arg;
  const char *sev = pq.resultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
  if (sev && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0)) c->ended = 1;
}

/* ---- the queue of calls waiting for the connection ------------------------------ */

static int drv__can_take(drv_pgc *c, lua_State *L) {
  if (c->busy) return 0;
  if (c->tx_owner) return c->tx_owner == L;
  return c->q_head == NULL;
}

static void drv__q_unlink(drv_pgq *q) {
  drv_pgc *c = q->c;
  if (q->prev) q->prev->next = q->next; else c->q_head = q->next;
  if (q->next) q->next->prev = q->prev; else c->q_tail = q->prev;
  q->prev = q->next = NULL;
}

static void drv__q_cancel(drv_wait *w) {
  drv_pgq *q = (drv_pgq *)w;
  drv__q_unlink(q);
  drv__wake(&q->wait, 0);
  free(q);
}

/* Wake every waiter: each checks again when it runs (first woken, first
 * resumed, so the order of arrival is kept). */
static void drv__q_wake_all(drv_pgc *c, int wake) {
  while (c->q_head) {
    drv_pgq *q = c->q_head;
    drv__q_unlink(q);
    if (wake) drv__wake(&q->wait, 0);
    free(q);
  }
}

/* The call that owned the connection is done with it. */
static void drv__release(drv_pgc *c) {
  c->busy = 0;
  c->retried = 0;
  drv__clear_results(c);
  if (!c->closed && c->pg && pq.status(c->pg) == CONNECTION_OK) drv__watch(c, UV_READABLE);
  drv__q_wake_all(c, 1);
}

/* ---- closing -------------------------------------------------------------------- */

static void drv__close_handle(drv_pgc *c, uv_handle_t *h) {
  h->data = c;
  c->handles++;
  uv_close(h, drv__handle_closed);
}

static void drv__unwatch(drv_pgc *c) {
  if (c->poll == NULL) return;
  drv__close_handle(c, (uv_handle_t *)c->poll);
  c->poll = NULL;
}

static void drv__stop_timer(drv_pgc *c) {
  if (c->timer == NULL) return;
  drv__close_handle(c, (uv_handle_t *)c->timer);
  c->timer = NULL;
}

/* Ask the server to stop the statement in flight.  PQcancel opens a second
 * short connection and blocks while doing so; it runs only when a task
 * waiting on a query is cancelled or the connection is closed under one. */
static void drv__cancel_query(drv_pgc *c) {
  PGcancel *cn;
  char buf[256];
  if (c->pg == NULL || (c->op != OP_QUERY && c->op != OP_PREPARE)) return;
  cn = pq.getCancel(c->pg);
  if (cn == NULL) return;
  pq.cancel(cn, buf, sizeof buf);
  pq.freeCancel(cn);
}

static void drv__finish_pg(drv_pgc *c) {
  drv__unwatch(c);
  drv__stop_timer(c);
  if (c->pg) pq.finish(c->pg);
  c->pg = NULL;
}

/* Close the connection: cancel what runs on the server, close the socket and
 * handles.  wake: let the owner and queued callers see it closed (close());
 * not when the engine or the state is going away (nobody will run). */
static void drv__shutdown(drv_pgc *c, int wake) {
  if (c->closed) return;
  c->closed = 1;
  drv__res_unlink(&c->res);
  drv__cancel_query(c);
  drv__finish_pg(c);
  c->op = OP_NONE;
  if (c->waiting) {
    c->waiting = 0;
    if (wake) drv__wake(&c->wait, 0);
  }
  drv__q_wake_all(c, wake);
  if (!wake) drv__clear_results(c);
}

static void drv__res_close(drv_res *r) { drv__shutdown((drv_pgc *)r, 0); }

/* ---- driving libpq --------------------------------------------------------------- */

/* The operation finished: wake its owner, or (its task was cancelled) clean
 * up and hand the connection on. */
static void drv__op_done(drv_pgc *c) {
  c->op = OP_NONE;
  drv__stop_timer(c);
  if (c->waiting) {
    c->waiting = 0;
    /* quiet until the owner sends again or releases (which watches) */
    if (c->pg == NULL || pq.status(c->pg) != CONNECTION_OK) drv__unwatch(c);
    else if (c->poll) uv_poll_stop(c->poll);
    drv__wake(&c->wait, 0);
  } else {
    drv__release(c);
  }
}

static void drv__connect_step(drv_pgc *c) {
  PostgresPollingStatusType st = pq.connectPoll(c->pg);
  /* libpq may have closed the socket and opened another (the next address
   * of a host): watch afresh after every step. */
  drv__unwatch(c);
  switch (st) {
  case PGRES_POLLING_READING: drv__watch(c, UV_READABLE); break;
  case PGRES_POLLING_WRITING: drv__watch(c, UV_WRITABLE); break;
  case PGRES_POLLING_OK:
    pq.setnonblocking(c->pg, 1);
    drv__op_done(c);
    break;
  default:
    drv__set_err(c, "");
    drv__op_done(c);
    break;
  }
}

/* Read what the server sent; collect results until libpq has them all. */
static void drv__query_read(drv_pgc *c) {
  PGresult *r;
  if (!pq.consumeInput(c->pg)) {
    drv__set_err(c, "connection lost");
    while ((r = pq.getResult(c->pg)) != NULL) pq.clear(r);
    drv__op_done(c);
    return;
  }
  while (!pq.isBusy(c->pg)) {
    r = pq.getResult(c->pg);
    if (r == NULL) {
      drv__op_done(c);
      return;
    }
    switch (pq.resultStatus(r)) {
    case PGRES_TUPLES_OK:
    case PGRES_COMMAND_OK:
    case PGRES_EMPTY_QUERY:
      if (c->res_ok) pq.clear(c->res_ok);
      c->res_ok = r;
      break;
    default:
      if (c->res_err == NULL) c->res_err = r; else pq.clear(r);
      break;
    }
  }
}

static void drv__poll_cb(uv_poll_t *h, int status, int events) {
  drv_pgc *c = (drv_pgc *)h->data;
  if (c->closed || c->pg == NULL) return;
  if (status < 0) events = UV_READABLE; /* let libpq find the error */
  switch (c->op) {
  case OP_CONNECT:
    drv__connect_step(c);
    break;
  case OP_PREPARE:
  case OP_QUERY:
    if (events & UV_WRITABLE) {
      int r = pq.flush(c->pg);
      if (r == 0) drv__watch(c, UV_READABLE);
      if (r < 0) events |= UV_READABLE;
    }
    if (events & UV_READABLE) drv__query_read(c);
    break;
  default:
    /* Idle: the server may be ending the session (pg_terminate_backend, a
     * shutdown).  Read it now so the next call finds the connection broken
     * before sending anything. */
    if (!pq.consumeInput(c->pg) || (pq.isBusy(c->pg), c->ended) ||
        pq.status(c->pg) != CONNECTION_OK) {
      drv__unwatch(c);
    } else {
      PGnotify *n;
      while ((n = pq.notifies(c->pg)) != NULL) pq.freemem(n);
    }
    break;
  }
}

static void drv__watch(drv_pgc *c, int events) {
  int fd = c->pg ? pq.socket(c->pg) : -1;
  if (fd < 0) return;
  if (c->poll == NULL) {
    c->poll = (uv_poll_t *)malloc(sizeof *c->poll);
    if (c->poll == NULL) return;
    if (uv_poll_init_socket(c->E->loop, c->poll, fd) != 0) {
      free(c->poll);
      c->poll = NULL;
      return;
    }
    c->poll->data = c;
  }
  uv_poll_start(c->poll, events, drv__poll_cb);
}

static void drv__timeout_cb(uv_timer_t *t) {
  drv_pgc *c = (drv_pgc *)t->data;
  char msg[64];
  if (c->op != OP_CONNECT) return;
  snprintf(msg, sizeof msg, "timed out after %g s", c->connect_timeout);
  free(c->errmsg);
  c->errmsg = strdup(msg);
  drv__unwatch(c);
  if (c->pg) pq.finish(c->pg);
  c->pg = NULL;
  drv__op_done(c);
}

static void drv__set_label(drv_pgc *c) {
  const char *host = pq.host(c->pg), *port = pq.port(c->pg), *db = pq.db(c->pg),
             *user = pq.user(c->pg);
  if (db == NULL && user == NULL) { /* libpq could not read the string */
    snprintf(c->label, sizeof c->label, "bad connection string");
    return;
  }
  snprintf(c->label, sizeof c->label, "%s@%s:%s/%s", user ? user : "?",
           host && *host ? host : "localhost", port && *port ? port : "5432", db ? db : "?");
}

/* Start (re)connecting; the operation completes through drv__op_done.
 * Returns 0 when it could not even start (errmsg set). */
static int drv__connect_start(drv_pgc *c) {
  drv__finish_pg(c);
  drv__clear_results(c);
  c->pg = pq.connectStart(c->conninfo);
  if (c->pg == NULL) {
    c->errmsg = strdup("out of memory");
    return 0;
  }
  c->ended = 0;
  pq.setNoticeReceiver(c->pg, drv__notice, c);
  if (c->label[0] == '\0') drv__set_label(c);
  if (pq.status(c->pg) == CONNECTION_BAD) {
    drv__set_err(c, "");
    pq.finish(c->pg);
    c->pg = NULL;
    return 0;
  }
  c->op = OP_CONNECT;
  c->timer = (uv_timer_t *)malloc(sizeof *c->timer);
  if (c->timer) {
    uv_timer_init(c->E->loop, c->timer);
    c->timer->data = c;
    uv_timer_start(c->timer, drv__timeout_cb, (uint64_t)(c->connect_timeout * 1000), 0);
  }
  /* "poll as if PGRES_POLLING_WRITING had been returned" */
  drv__watch(c, UV_WRITABLE);
  return 1;
}

/* ---- Lua side ---------------------------------------------------------------------- */

static drv_pgc *drv__check(lua_State *L, const char *fname) {
  drv_pgud *u = NULL;
  if (lua_type(L, 1) == LUA_TUSERDATA && lua_getmetatable(L, 1)) {
    if (lua_rawequal(L, -1, lua_upvalueindex(1))) u = (drv_pgud *)lua_touserdata(L, 1);
    lua_pop(L, 1);
  }
  if (u == NULL) drv__argerror(L, fname, "self", "drover.pg connection", 1);
  return u->c;
}

static int drv__isbytea(lua_State *L, int idx) {
  int r = 0;
  if (lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
    r = lua_rawequal(L, -1, lua_upvalueindex(2));
    lua_pop(L, 1);
  }
  return r;
}

static int drv__closed_error(lua_State *L, drv_pgc *c, const char *fname) {
  return luaL_error(L, "%s: the connection is closed (%s)", fname, c->label);
}

/* nil, "drover.pg: message" and release the connection. */
static int drv__fail(lua_State *L, drv_pgc *c, const char *msg) {
  lua_pushfstring(L, "drover.pg: %s", msg); /* msg may be on the stack: copy first */
  lua_pushnil(L);
  lua_insert(L, -2);
  if (c->busy) drv__release(c);
  return 2;
}

/* The server may have ended the session while we were idle (its FATAL
 * message, then end of file) without the loop having read it yet.  One
 * poll() says whether anything is waiting; reading it all marks the
 * connection broken when the session is gone.  Each PQconsumeInput stops
 * after the data it got, so the end of file takes another call. */
static void drv__check_alive(drv_pgc *c) {
  struct pollfd p;
  int i;
  if (c->pg == NULL) return;
  p.fd = pq.socket(c->pg);
  p.events = POLLIN;
  p.revents = 0;
  if (!c->ended && pq.status(c->pg) == CONNECTION_OK && poll(&p, 1, 0) > 0) {
    for (i = 0; i < 4 && pq.status(c->pg) == CONNECTION_OK; i++) {
      if (!pq.consumeInput(c->pg)) break;
      pq.isBusy(c->pg); /* parses what came: a FATAL reaches drv__notice */
    }
  }
  if (pq.status(c->pg) != CONNECTION_OK || c->ended) drv__finish_pg(c);
}

/* Wait for the operation the caller just started. */
static int drv__op_await(lua_State *L, drv_pgc *c, lua_KFunction k, lua_KContext ctx);

static void drv__op_cancel(drv_wait *w) {
  drv_pgc *c = (drv_pgc *)((char *)w - offsetof(drv_pgc, wait));
  /* The task raises "cancelled" where it waited; the operation goes on
   * without an owner and drv__op_done hands the connection on. */
  c->waiting = 0;
  if (c->op == OP_CONNECT) {
    drv__finish_pg(c);
    c->op = OP_NONE;
    drv__release(c);
  } else {
    drv__cancel_query(c);
  }
  drv__wake(w, 0);
}

static int drv__op_await(lua_State *L, drv_pgc *c, lua_KFunction k, lua_KContext ctx) {
  drv__wait_init(&c->wait, L);
  c->wait.cancel = drv__op_cancel;
  c->waiting = 1;
  return drv__awaitk(L, &c->wait, k, ctx);
}

static int drv__qk(lua_State *L, int status, lua_KContext ctx) {
  drv_pgud *u = (drv_pgud *)lua_touserdata(L, 1);
  (void)status;
  return drv__q(L, u->c, (int)(ctx & 15), (int)(ctx >> 4));
}

/* Bind the parameters at 3..top and send.  Returns 1 when sent, 0 when the
 * connection broke before anything left (reconnect and retry), -1 on any
 * other failure (message pushed). */
static int drv__send(lua_State *L, drv_pgc *c, const char *fname, const char *name, int prepare,
                     int exec) {
  int n = lua_gettop(L) - 2, i, ok, fl;
  const char *sql = exec ? NULL : lua_tostring(L, 2);
  const char **values = NULL;
  int *lengths = NULL, *formats = NULL;
  Oid *types = NULL;
  char *nums = NULL;
  if (n > 65535) {
    lua_pushfstring(L, "too many parameters (%d, at most 65535)", n);
    return -1;
  }
  if (n > 0) {
    values = (const char **)calloc((size_t)n, sizeof *values);
    lengths = (int *)calloc((size_t)n, sizeof *lengths);
    formats = (int *)calloc((size_t)n, sizeof *formats);
    types = (Oid *)calloc((size_t)n, sizeof *types);
    nums = (char *)malloc((size_t)n * 32);
    if (!values || !lengths || !formats || !types || !nums) {
      free(values); free(lengths); free(formats); free(types); free(nums);
      lua_pushliteral(L, "out of memory");
      return -1;
    }
  }
  for (i = 0; i < n; i++) {
    int idx = i + 3;
    char *num = nums + (size_t)i * 32;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: break;
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, idx) == NULL) break; /* drover.json.null */
      goto bad;
    case LUA_TBOOLEAN:
      values[i] = lua_toboolean(L, idx) ? "t" : "f";
      types[i] = OID_BOOL;
      break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        snprintf(num, 32, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
      } else {
        double d = lua_tonumber(L, idx);
        if (isnan(d)) strcpy(num, "NaN");
        else if (isinf(d)) strcpy(num, d > 0 ? "Infinity" : "-Infinity");
        else snprintf(num, 32, "%.17g", d);
      }
      values[i] = num;
      break;
    case LUA_TSTRING: {
      size_t len;
      values[i] = lua_tolstring(L, idx, &len);
      if (len > 0x7fffffff) goto bad;
      if (memchr(values[i], 0, len) != NULL) { /* only bytea takes zero bytes */
        formats[i] = 1;
        lengths[i] = (int)len;
      }
      break;
    }
    case LUA_TUSERDATA:
      if (drv__isbytea(L, idx)) {
        values[i] = (const char *)lua_touserdata(L, idx);
        lengths[i] = (int)lua_rawlen(L, idx);
        formats[i] = 1;
        types[i] = OID_BYTEA;
        break;
      }
      /* fallthrough */
    default:
    bad:
      free(values); free(lengths); free(formats); free(types); free(nums);
      lua_pushfstring(L, "%s: bad argument #%d (nil, boolean, number, string or "
                         "drover.pg.bytea expected, got %s)", fname, i + 1, luaL_typename(L, idx));
      return -2;
    }
  }
  if (sql == NULL) /* exec: the simple protocol, which takes scripts */
    ok = pq.sendQuery(c->pg, lua_tostring(L, 2));
  else if (prepare)
    ok = pq.sendPrepare(c->pg, name, sql, n, types);
  else if (name)
    ok = pq.sendQueryPrepared(c->pg, name, n, values, lengths, formats, 0);
  else
    ok = pq.sendQueryParams(c->pg, sql, n, types, values, lengths, formats, 0);
  free(values); free(lengths); free(formats); free(types); free(nums);
  if (!ok) {
    if (pq.status(c->pg) != CONNECTION_OK) return 0;
    {
      char *line = drv__oneline(c, pq.errorMessage(c->pg));
      lua_pushfstring(L, "%s: %s", c->label, line ? line : "out of memory");
      free(line);
    }
    return -1;
  }
  c->op = prepare ? OP_PREPARE : OP_QUERY;
  c->queries += !prepare;
  fl = pq.flush(c->pg);
  drv__watch(c, UV_READABLE | (fl == 1 ? UV_WRITABLE : 0));
  return 1;
}

/* ---- results ---------------------------------------------------------------------- */

/* numeric: an integer when integral and in range, a number when a double
 * holds it exactly enough (at most 15 significant digits, counted from the
 * first to the last non-zero digit), else the exact text.  NaN and the
 * infinities are numbers. */
static void drv__push_numeric(lua_State *L, const char *s, size_t len) {
  const char *p;
  int digits = 0, seen = 0, zeros = 0;
  if (strchr(s, '.') == NULL && lua_stringtonumber(L, s) != 0) {
    if (lua_isinteger(L, -1)) return;
    lua_pop(L, 1);
  }
  for (p = s; *p; p++) {
    if (*p < '0' || *p > '9') continue;
    if (*p == '0') {
      zeros += seen; /* zeros count only when a non-zero digit follows */
    } else {
      digits += zeros + 1;
      zeros = 0;
      seen = 1;
    }
  }
  if (digits <= 15 || strcmp(s, "NaN") == 0 || strstr(s, "Infinity") != NULL) {
    lua_pushnumber(L, strtod(s, NULL));
    return;
  }
  lua_pushlstring(L, s, len);
}

static void drv__push_value(lua_State *L, const PGresult *r, int row, int col) {
  const char *s = pq.getvalue(r, row, col);
  size_t len = (size_t)pq.getlength(r, row, col);
  switch (pq.ftype(r, col)) {
  case OID_BOOL:
    lua_pushboolean(L, s[0] == 't');
    break;
  case OID_INT2:
  case OID_INT4:
  case OID_INT8:
  case OID_OID:
    if (lua_stringtonumber(L, s) == 0) lua_pushlstring(L, s, len);
    break;
  case OID_FLOAT4:
  case OID_FLOAT8:
    lua_pushnumber(L, strtod(s, NULL));
    break;
  case OID_NUMERIC:
    drv__push_numeric(L, s, len);
    break;
  case OID_BYTEA: {
    size_t n = 0;
    unsigned char *b = pq.unescapeBytea((const unsigned char *)s, &n);
    if (b == NULL) {
      lua_pushlstring(L, s, len);
    } else {
      lua_pushlstring(L, (const char *)b, n);
      pq.freemem(b);
    }
    break;
  }
  default:
    lua_pushlstring(L, s, len);
    break;
  }
}

/* Push row `row` as {name = value}; NULL is the connection's null value
 * (uservalue 2: nil, i.e. absent, unless opts.null was given). */
static void drv__push_row(lua_State *L, const PGresult *r, int row, int nf) {
  int col;
  lua_createtable(L, 0, nf);
  for (col = 0; col < nf; col++) {
    if (pq.getisnull(r, row, col)) {
      lua_getiuservalue(L, 1, 2);
      if (lua_isnil(L, -1)) { lua_pop(L, 1); continue; }
    } else {
      drv__push_value(L, r, row, col);
    }
    lua_setfield(L, -2, pq.fname(r, col));
  }
}

static int drv__push_result(lua_State *L, drv_pgc *c, int mode) {
  PGresult *r = c->res_ok;
  int nt, nf, i;
  lua_settop(L, 1);
  if (r == NULL) {
    drv__release(c);
    lua_pushnil(L);
    return 1;
  }
  c->res_ok = NULL; /* ours now: release() must not free it */
  drv__release(c);
  nt = pq.ntuples(r);
  nf = pq.nfields(r);
  switch (mode) {
  case M_ROWS:
    lua_createtable(L, nt, 0);
    for (i = 0; i < nt; i++) {
      drv__push_row(L, r, i, nf);
      lua_rawseti(L, -2, i + 1);
    }
    break;
  case M_FIRST:
    if (nt > 0) drv__push_row(L, r, 0, nf); else lua_pushnil(L);
    break;
  case M_VALUE:
    if (nt == 0 || nf == 0) lua_pushnil(L);
    else if (pq.getisnull(r, 0, 0)) lua_getiuservalue(L, 1, 2);
    else drv__push_value(L, r, 0, 0);
    break;
  case M_EXEC:
    lua_pushboolean(L, 1);
    break;
  default: {
    const char *t = pq.cmdTuples(r);
    lua_pushinteger(L, t && *t ? (lua_Integer)strtoll(t, NULL, 10) : 0);
    break;
  }
  }
  pq.clear(r);
  return 1;
}

/* "SQLSTATE: message (detail)" of an error result. */
static int drv__result_error(lua_State *L, drv_pgc *c, PGresult *r) {
  const char *state = pq.resultErrorField(r, PG_DIAG_SQLSTATE);
  const char *prim = pq.resultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
  const char *detail = pq.resultErrorField(r, PG_DIAG_MESSAGE_DETAIL);
  char *line = NULL;
  if (prim == NULL) prim = line = drv__oneline(c, pq.resultErrorMessage(r));
  lua_pushfstring(L, "%s: %s%s%s%s", state ? state : "?????", prim ? prim : "error",
                  detail ? " (" : "", detail ? detail : "", detail ? ")" : "");
  free(line);
  return drv__fail(L, c, lua_tostring(L, -1));
}

/* Did the command just answered fail (or its connection close)? */
static int drv__reply_failed(drv_pgc *c) { return c->closed || c->res_err || c->errmsg; }

/* The failure of the command just answered: the server's error (with its
 * SQLSTATE) before the connection's own message. */
static int drv__reply_error(lua_State *L, drv_pgc *c) {
  if (c->closed) return drv__fail(L, c, "the connection was closed");
  if (c->res_err && (pq.resultErrorField(c->res_err, PG_DIAG_SQLSTATE) || !c->errmsg))
    return drv__result_error(L, c, c->res_err);
  lua_pushfstring(L, "%s: %s", c->label, c->errmsg);
  return drv__fail(L, c, lua_tostring(L, -1));
}

/* The whole call, as a state machine across waits (see ST_*).  The stack is
 * always [self, sql, params...] when it waits. */
static int drv__q(lua_State *L, drv_pgc *c, int mode, int step) {
  const char *fname = drv__fname[mode];
  const char *name = NULL;
  int sent;
  switch (step) {
  case ST_START: {
    drv_wait w;
    if (c->closed) return drv__closed_error(L, c, fname);
    drv__wait_init(&w, L); /* raises here if this thread cannot wait: before anything starts */
    if (!drv__can_take(c, L)) {
      drv_pgq *q;
      q = (drv_pgq *)calloc(1, sizeof *q);
      if (q == NULL) return luaL_error(L, "%s: out of memory", fname);
      q->wait = w;
      q->wait.cancel = drv__q_cancel;
      q->c = c;
      q->prev = c->q_tail;
      if (c->q_tail) c->q_tail->next = q; else c->q_head = q;
      c->q_tail = q;
      return drv__awaitk(L, &q->wait, drv__qk, KCTX(mode, ST_START));
    }
    c->busy = 1;
    c->retried = 0;
    if (mode == M_ENTER) {
      c->tx_owner = L;
      lua_pushinteger(L, c->tx_depth);
      c->busy = 0;
      return 1;
    }
    goto send;
  }
  case ST_CONNECTED:
    if (c->closed) return drv__fail(L, c, "the connection was closed");
    if (c->errmsg) {
      lua_pushfstring(L, "%s: %s", c->label, c->errmsg);
      return drv__fail(L, c, lua_tostring(L, -1));
    }
    c->reconnects++;
    c->stale_cache = 1;
    goto send;
  case ST_PREPARED:
    if (drv__reply_failed(c)) return drv__reply_error(L, c);
    drv__clear_results(c);
    /* cache[sql] = name: it exists on the server now */
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_pushstring(L, c->pending_name);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    c->cache_n++;
    c->prepares++;
    name = c->pending_name;
    goto execute;
  default: /* ST_RESULT */
    if (drv__reply_failed(c)) return drv__reply_error(L, c);
    return drv__push_result(L, c, mode);
  }

send:
  /* Broken before we send anything?  Then reconnect. */
  drv__check_alive(c);
  if (c->pg == NULL || pq.status(c->pg) != CONNECTION_OK) {
    if (c->tx_depth > 0) {
      lua_pushfstring(L, "%s: connection lost inside a transaction", c->label);
      return drv__fail(L, c, lua_tostring(L, -1));
    }
    if (!drv__connect_start(c)) {
      lua_pushfstring(L, "%s: %s", c->label, c->errmsg ? c->errmsg : "cannot connect");
      return drv__fail(L, c, lua_tostring(L, -1));
    }
    c->retried = 1;
    return drv__op_await(L, c, drv__qk, KCTX(mode, ST_CONNECTED));
  }
  if (c->stale_cache) {
    lua_newtable(L);
    lua_setiuservalue(L, 1, 1);
    c->cache_n = 0;
    c->stale_cache = 0;
  }
  if (mode == M_EXEC) goto execute;
  lua_getiuservalue(L, 1, 1);
  lua_pushvalue(L, 2);
  lua_rawget(L, -2);
  name = lua_tostring(L, -1); /* anchored in the cache table, itself in the uservalue */
  lua_pop(L, 2);
  if (name != NULL) {
    c->hits++;
  } else if (c->cache_n < c->cache_max) {
    char buf[32];
    snprintf(buf, sizeof buf, "drover_%lu", ++c->next_stmt);
    lua_pushstring(L, buf);
    lua_setiuservalue(L, 1, 3); /* keeps the name alive until it is cached */
    lua_getiuservalue(L, 1, 3);
    c->pending_name = lua_tostring(L, -1);
    lua_pop(L, 1);
    sent = drv__send(L, c, fname, c->pending_name, 1, 0);
    goto sent;
  }
execute:
  sent = drv__send(L, c, fname, name, 0, mode == M_EXEC);
sent:
  if (sent == -2) { /* bad argument: raise, as every drover primitive does */
    drv__release(c);
    return lua_error(L);
  }
  if (sent < 0) return drv__fail(L, c, lua_tostring(L, -1));
  if (sent == 0) {
    if (c->retried || c->tx_depth > 0) {
      char *line = drv__oneline(c, pq.errorMessage(c->pg));
      lua_pushfstring(L, "%s: connection lost: %s", c->label, line ? line : "");
      free(line);
      return drv__fail(L, c, lua_tostring(L, -1));
    }
    goto send; /* nothing left: reconnect and send again */
  }
  return drv__op_await(L, c, drv__qk,
                       KCTX(mode, c->op == OP_PREPARE ? ST_PREPARED : ST_RESULT));
}

static int drv__l_query(lua_State *L, int mode) {
  const char *fname = drv__fname[mode];
  drv_pgc *c = drv__check(L, fname);
  size_t len;
  const char *sql;
  if (lua_type(L, 2) != LUA_TSTRING) return drv__argerror(L, fname, "sql", "string", 2);
  sql = lua_tolstring(L, 2, &len);
  if (memchr(sql, 0, len) != NULL)
    return luaL_error(L, "%s: bad argument 'sql' (contains a zero byte)", fname);
  return drv__q(L, c, mode, ST_START);
}

static int drv__l_rows(lua_State *L) { return drv__l_query(L, M_ROWS); }
static int drv__l_first(lua_State *L) { return drv__l_query(L, M_FIRST); }
static int drv__l_value(lua_State *L) { return drv__l_query(L, M_VALUE); }
static int drv__l_run(lua_State *L) { return drv__l_query(L, M_RUN); }

static int drv__l_exec(lua_State *L) {
  if (lua_gettop(L) > 2)
    return luaL_error(L, "drover.pg.exec: a script takes no parameters (use run)");
  return drv__l_query(L, M_EXEC);
}

/* c:_enter() -> depth: wait until this thread may own the connection's
 * transaction, and own it (pg.lua's transaction then sends BEGIN or a
 * SAVEPOINT and sets the depth with _depth). */
static int drv__l_enter(lua_State *L) {
  drv_pgc *c = drv__check(L, "drover.pg.transaction");
  lua_settop(L, 1);
  lua_pushliteral(L, ""); /* the stack shape of a query: [self, sql] */
  return drv__q(L, c, M_ENTER, ST_START);
}

/* c:_depth(n): the transaction's nesting is now n; at 0 this thread no
 * longer owns the connection. */
static int drv__l_depth(lua_State *L) {
  drv_pgc *c = drv__check(L, "drover.pg.transaction");
  int n = (int)luaL_checkinteger(L, 2);
  if (c->tx_owner != L) return 0;
  c->tx_depth = n;
  if (n <= 0) {
    c->tx_depth = 0;
    c->tx_owner = NULL;
    drv__q_wake_all(c, 1);
  }
  return 0;
}

static int drv__l_close(lua_State *L) {
  drv_pgc *c = drv__check(L, "drover.pg.close");
  drv__shutdown(c, 1);
  return 0;
}

static int drv__l_gc(lua_State *L) {
  drv_pgud *u = (drv_pgud *)lua_touserdata(L, 1);
  if (u->c == NULL) return 0;
  drv__shutdown(u->c, 0);
  u->c->lua_gone = 1;
  drv__maybe_free(u->c);
  u->c = NULL;
  return 0;
}

static int drv__l_isopen(lua_State *L) {
  drv_pgc *c = drv__check(L, "drover.pg.isopen");
  lua_pushboolean(L, !c->closed);
  return 1;
}

static int drv__l_backend_pid(lua_State *L) {
  drv_pgc *c = drv__check(L, "drover.pg.backend_pid");
  if (c->pg == NULL || pq.status(c->pg) != CONNECTION_OK) return 0;
  lua_pushinteger(L, pq.backendPID(c->pg));
  return 1;
}

/* c:txstatus() -> "idle", "active", "intrans", "inerror" (a statement of
 * the open transaction failed: only a rollback is possible) or "unknown"
 * (broken or closed). */
static int drv__l_txstatus(lua_State *L) {
  static const char *const names[] = {"idle", "active", "intrans", "inerror", "unknown"};
  drv_pgc *c = drv__check(L, "drover.pg.txstatus");
  int st = c->pg ? (int)pq.transactionStatus(c->pg) : (int)PQTRANS_UNKNOWN;
  lua_pushstring(L, names[st >= 0 && st <= 4 ? st : 4]);
  return 1;
}

static int drv__l_label(lua_State *L) {
  drv_pgc *c = drv__check(L, "drover.pg.label");
  lua_pushstring(L, c->label);
  return 1;
}

static int drv__l_stats(lua_State *L) {
  drv_pgc *c = drv__check(L, "drover.pg.stats");
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, c->queries);
  lua_setfield(L, -2, "queries");
  lua_pushinteger(L, c->prepares);
  lua_setfield(L, -2, "prepares");
  lua_pushinteger(L, c->hits);
  lua_setfield(L, -2, "hits");
  lua_pushinteger(L, c->reconnects);
  lua_setfield(L, -2, "reconnects");
  lua_pushinteger(L, c->cache_n);
  lua_setfield(L, -2, "cached");
  return 1;
}

static int drv__l_tostring(lua_State *L) {
  drv_pgud *u = (drv_pgud *)lua_touserdata(L, 1);
  if (u->c == NULL) lua_pushliteral(L, "drover.pg(closed)");
  else lua_pushfstring(L, "drover.pg(%s%s)", u->c->label, u->c->closed ? ", closed" : "");
  return 1;
}

/* ---- connecting ------------------------------------------------------------------- */

static int drv__connect_k(lua_State *L, int status, lua_KContext ctx) {
  drv_pgud *u = (drv_pgud *)lua_touserdata(L, 3);
  drv_pgc *c = u->c;
  (void)status;
  (void)ctx;
  if (c->closed || c->errmsg) {
    lua_pushfstring(L, "drover.pg.connect: %s: %s", c->label,
                    c->closed ? "closed while connecting" : c->errmsg);
    lua_pushnil(L);
    lua_insert(L, -2);
    c->busy = 0;
    drv__shutdown(c, 0);
    return 2;
  }
  drv__release(c);
  lua_settop(L, 3);
  return 1;
}

/* core.pg.connect(conninfo, opts) -> connection, or nil, message */
static int drv__l_connect(lua_State *L) {
  static const char *F = "drover.pg.connect";
  static const char *const keys[] = {"connect_timeout", "cache_size", "null", NULL};
  const char *conninfo, *err;
  double timeout, cache;
  drv_pgud *u;
  drv_pgc *c;
  drv_engine *E = drv__engine(L);
  if (lua_type(L, 1) != LUA_TSTRING) return drv__argerror(L, F, "conninfo", "string", 1);
  conninfo = lua_tostring(L, 1);
  if (!lua_isnoneornil(L, 2)) {
    if (lua_type(L, 2) != LUA_TTABLE) return drv__argerror(L, F, "opts", "table", 2);
    drv__opt_known(L, 2, F, keys);
  }
  timeout = drv__opt_number(L, 2, F, "connect_timeout", 10);
  cache = drv__opt_number(L, 2, F, "cache_size", DRV_PG_CACHE_DEFAULT);
  if (!(timeout > 0 && timeout <= 3600))
    return luaL_error(L, "%s: bad option 'connect_timeout' (seconds, above 0 and at most 3600)", F);
  if (!(cache >= 0 && cache <= 100000))
    return luaL_error(L, "%s: bad option 'cache_size' (0 to 100000 statements)", F);
  if (E->closing) return luaL_error(L, "%s: the engine is closing", F);
  {
    drv_wait probe;
    drv__wait_init(&probe, L); /* raises if this thread cannot wait */
  }
  if ((err = drv__pq_load()) != NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s (install libpq5)", F, err);
    return 2;
  }
  lua_settop(L, 2);
  u = (drv_pgud *)lua_newuserdatauv(L, sizeof *u, 3);
  u->c = NULL;
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_setmetatable(L, -2);
  lua_newtable(L);
  lua_setiuservalue(L, 3, 1); /* the statement cache: sql -> name */
  if (!lua_isnoneornil(L, 2)) {
    lua_getfield(L, 2, "null");
    lua_setiuservalue(L, 3, 2);
  }
  c = (drv_pgc *)calloc(1, sizeof *c);
  if (c == NULL || (c->conninfo = strdup(conninfo)) == NULL) {
    free(c);
    return luaL_error(L, "%s: out of memory", F);
  }
  u->c = c;
  c->E = E;
  c->connect_timeout = timeout;
  c->cache_max = (int)cache;
  drv__res_link(E, &c->res, drv__res_close);
  c->busy = 1;
  if (!drv__connect_start(c)) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s: %s", F, c->label[0] ? c->label : "?", c->errmsg ? c->errmsg : "");
    c->busy = 0;
    drv__shutdown(c, 0);
    return 2;
  }
  return drv__op_await(L, c, drv__connect_k, 0);
}

/* drover.pg.bytea(s) -> a value that binds as bytea (binary, any bytes). */
static int drv__l_bytea(lua_State *L) {
  size_t n;
  const char *s;
  void *p;
  if (lua_type(L, 1) != LUA_TSTRING) return drv__argerror(L, "drover.pg.bytea", "s", "string", 1);
  s = lua_tolstring(L, 1, &n);
  p = lua_newuserdatauv(L, n, 0);
  if (n) memcpy(p, s, n);
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_setmetatable(L, -2);
  return 1;
}

static int drv__l_bytea_tostring(lua_State *L) {
  lua_pushlstring(L, (const char *)lua_touserdata(L, 1), lua_rawlen(L, 1));
  return 1;
}

int drv__open_pg(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"rows", drv__l_rows},       {"first", drv__l_first},   {"value", drv__l_value},
      {"run", drv__l_run},         {"exec", drv__l_exec},     {"close", drv__l_close},   {"isopen", drv__l_isopen},
      {"stats", drv__l_stats},   {"label", drv__l_label},
      {"backend_pid", drv__l_backend_pid}, {"txstatus", drv__l_txstatus},
      {"_enter", drv__l_enter},    {"_depth", drv__l_depth},  {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__gc", drv__l_gc},
                                  {"__close", drv__l_close},
                                  {"__tostring", drv__l_tostring},
                                  {NULL, NULL}};
  static const luaL_Reg byteameta[] = {{"__tostring", drv__l_bytea_tostring}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"connect", drv__l_connect}, {"bytea", drv__l_bytea},
                                   {NULL, NULL}};
  int mod = lua_gettop(L), mt, bmt, methods_idx;
  luaL_newmetatable(L, DRV_PG_MT);
  mt = lua_gettop(L);
  luaL_newmetatable(L, DRV_BYTEA_MT);
  bmt = lua_gettop(L);
#define DRV_SETFUNCS(idx, l)                                                    \
  do {                                                                          \
    lua_pushvalue(L, (idx));                                                    \
    lua_pushvalue(L, mt);                                                       \
    lua_pushvalue(L, bmt);                                                      \
    luaL_setfuncs(L, (l), 2);                                                   \
    lua_pop(L, 1);                                                              \
  } while (0)
  DRV_SETFUNCS(bmt, byteameta);
  DRV_SETFUNCS(mt, meta);
  lua_newtable(L);
  methods_idx = lua_gettop(L);
  DRV_SETFUNCS(methods_idx, methods);
  DRV_SETFUNCS(mod, funcs);
#undef DRV_SETFUNCS
  lua_pushvalue(L, methods_idx);
  lua_setfield(L, mt, "__index");
  lua_pushvalue(L, methods_idx);
  lua_setfield(L, mod, "methods"); /* so drover/pg.lua can add Lua methods */
  lua_settop(L, mod);
  return 0;
}
