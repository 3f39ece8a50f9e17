/*
 * server.c -- drover.server: an HTTP/1.1 server on the engine's own loop,
 * in the OpenResty spirit: every request runs a Lua handler as a drover
 * task, so the handler may wait (query the store, sleep, call other HTTP
 * services) while the loop serves everybody else.
 *
 * The HTTP protocol work is H2O's (libh2o, libuv flavour: Debian's 2.2.5):
 * parsing, keep-alive, chunked encoding, 100-continue, timeouts.  This file
 * owns the listener, the accepted sockets and the glue to Lua:
 *
 *   listener --accept--> drv_conn (our uv handle, H2O's socket) --H2O-->
 *   on_req --> drv_sreq (one per request) + a task running
 *   dispatch(req, res) --> the Lua handler --> res:respond / start / write
 *   / finish, which call h2o_send.
 *
 * Nothing Lua runs inside an H2O callback beyond building the request
 * table and spawning the task (in a protected call); the handler itself
 * runs from the scheduler's run queue like every other task.  Two hooks
 * that may not wait are the exceptions: check_head (a request's head,
 * before its body is read) and fast (a request, before a task is made:
 * an answer already at hand, such as a cached page, is sent from a loop
 * callback with no task, no res object and no copy of its body when it
 * is a body object -- see drv_body; a pass's requests are asked together,
 * see drv__srv_fast_batch).
 *
 * Three lifetimes meet here and each is tracked explicitly:
 *
 *   - The H2O request (h2o_req_t) ends when H2O disposes of its memory
 *     pool: after the response is written, or when the connection dies.
 *     A small object in that pool tells us (drv__sreq_disposed).
 *   - The Lua `res` object may outlive the request (a handler that keeps
 *     it) or go first.  drv_sreq is reference counted by both sides.
 *   - The server outlives its connections: it is finalized (H2O context
 *     and config disposed) only when no connection is left, and freed two
 *     loop passes later, once libuv is done with every handle in it.
 *
 * H2O's HTTP/1 stops reading a connection while a request is processed,
 * so it only learns that a client hung up when it writes.  A handler that
 * waits for a long time (a log tail, server-sent events with no news)
 * would never notice; a timer therefore polls the sockets of unanswered
 * and streaming requests for POLLRDHUP, and a client that went away has
 * its request aborted: a handler waiting in res:write gets nil, "closed",
 * one waiting for anything else has its task cancelled.
 *
 * TLS (opts.tls) is H2O's too: h2o_accept runs the handshake with our
 * SSL_CTX before the connection becomes HTTP/1.  One thing is ours: a
 * client that speaks plain HTTP to the TLS port would only see the
 * connection drop (OpenSSL gives up on "GET /"), so the first bytes of each
 * connection are looked at before H2O gets it, and plain HTTP is answered
 * with a 400 saying to use https:// (drv__tls_sniff).
 *
 * Closing the engine closes every listener and connection at once, through
 * H2O's own callbacks so that H2O frees what it holds (drv__conn_force_close)
 * -- the engine then closes whatever handles are left, and an H2O socket
 * closed under H2O's feet would be a double close.
 */
#include "drover_int.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <netinet/in.h>

#include "h2o.h"
#include "h2o/http1.h"

#include <openssl/err.h>
#include <openssl/ssl.h>

#define DRV_SERVER_MT "drover.server"
#define DRV_RES_MT "drover.server.response"
#define DRV_BODY_MT "drover.server.body"
#define DRV_WATCH_MS 250       /* how often unanswered requests' clients are checked */
#define DRV_DEFAULT_MAX_BODY (64.0 * 1024 * 1024)
#define DRV_DEFAULT_MAX_CONNS 1024
#define DRV_HEAD_MAX (H2O_MAX_REQLEN + 16) /* a head not complete by then H2O refuses too */
#define DRV_DISCARD_MAX (1024 * 1024) /* body bytes read and dropped after a refusal */

typedef struct drv_server drv_server;
typedef struct drv_conn drv_conn;
typedef struct drv_sreq drv_sreq;

typedef union {
  uv_handle_t handle;
  uv_stream_t stream;
  uv_tcp_t tcp;
  uv_pipe_t pipe;
} drv_stream_u;

enum { S_NEW, S_STREAM, S_DONE };             /* drv_sreq.state */
enum { P_NONE, P_CHUNK, P_FINAL, P_ERROR };  /* what waits for the write in flight */

struct drv_sreq {
  drv_wait wait;        /* first: res:start / res:write waiting for the socket */
  h2o_generator_t gen;  /* streaming responses: H2O calls proceed when ready */
  drv_engine *E;
  drv_server *srv;      /* NULL once the request is gone */
  drv_conn *conn;
  h2o_req_t *req;       /* NULL once H2O disposed of the request */
  drv_sreq *prev, *next;/* srv->live */
  drv_sreq **res;       /* slot in the Lua res userdata; NULL once collected */
  drv_sreq *fast_next;  /* srv->fast_head: waiting for opts.fast */
  uint64_t time;        /* uv_hrtime() when H2O had the whole request (req.time) */
  drv_task *task;       /* the handler task; anchored by res (uservalue) */
  char *outbuf;         /* the bytes H2O is writing (or wrote, for the last send) */
  char *pend;           /* queued behind the write in flight */
  size_t pend_len;
  int pend_what;
  int refs;             /* one for H2O's request, one for the Lua res object,
                           one while it waits in srv->fast_head */
  int state;
  unsigned waiting : 1;  /* a task waits in r->wait */
  unsigned inflight : 1; /* a send waits for H2O's proceed */
  unsigned answered : 1; /* the handler finished or dropped the response itself */
  unsigned is_head : 1;
};

struct drv_conn {
  drv_stream_u h;       /* first: the close callback gets &h.handle */
  drv_server *srv;
  h2o_socket_t *sock;   /* NULL once H2O closed the socket */
  drv_sreq *req;        /* the request being served, if any */
  drv_conn *prev, *next;/* srv->conns */
  char addr[INET6_ADDRSTRLEN + 8];
  int port;
  int addr_known;
  h2o_timeout_entry_t sniff; /* TLS servers: waiting for the first bytes */
  /* check_head (see drv__conn_on_read): H2O's read callback, wrapped */
  h2o_socket_cb h2o_read;
  char *refusal;        /* the answer to a refused head, while it is written */
  size_t discarded;     /* body bytes dropped since */
  size_t scan;          /* how far the current head was searched */
  unsigned head_checked : 1; /* the current request's head was looked at */
  unsigned in_head : 1;      /* past the empty lines before it */
  unsigned refused : 1;
  unsigned close_after_write : 1; /* the refused client is done before its answer is */
};

typedef struct {
  h2o_handler_t super;
  drv_server *srv;
} drv_handler;

struct drv_server {
  drv_res res;          /* first: closed with the engine */
  drv_engine *E;
  h2o_globalconf_t config;
  h2o_context_t ctx;
  h2o_accept_ctx_t accept_ctx;
  drv_stream_u listener;
  uv_timer_t watch;     /* client-gone checks; also the first close stage */
  uv_prepare_t wrap;    /* check_head: wraps H2O's read callbacks before each poll */
  uv_idle_t reaper;     /* second close stage, initialised only then */
  uv_check_t fast_check; /* opts.fast: the requests of a loop pass together */
  uv_idle_t fast_idle;
  drv_sreq *fast_head, *fast_tail;
  drv_conn *conns;      /* connections H2O still serves */
  drv_sreq *live;       /* requests H2O has not disposed of */
  int nconns, nlive;
  uint64_t served;      /* requests received */
  int env_ref;          /* registry: { spawn =, dispatch =, res_mt = } */
  drv_server **owner;   /* the Lua server object's slot, NULL once collected */
  struct pollfd *pfds;
  drv_sreq **preqs;
  size_t pcap;
  char *unix_path;
  SSL_CTX *ssl_ctx;     /* TLS servers only; freed with the server */
  int is_unix;
  int closing, finalized;
  int has_check;        /* env has check_head */
  int has_fast;         /* env has fast */
  int max_conns;
  uint64_t turned_away; /* connections refused over max_conns */
};

/* A response body made once and sent many times (server.body): the bytes
 * live outside Lua, reference counted by the Lua object and by every
 * response that carries them, so a cached page is handed to H2O as it is
 * -- no copy into the request's pool per response.  A response's reference
 * goes when H2O disposes of the request's pool, i.e. once the bytes are
 * written or the connection is gone; the Lua object's when it is
 * collected. */
typedef struct {
  size_t refs;
  size_t len;
  char bytes[];
} drv_body;

static size_t drv__bodies, drv__body_bytes; /* live ones, process-wide: server.body_stats() */

static void drv__body_unref(drv_body *b) {
  if (--b->refs > 0) return;
  drv__bodies--;
  drv__body_bytes -= b->len;
  free(b);
}

/* The body object at idx, or NULL. */
static drv_body *drv__test_body(lua_State *L, int idx) {
  drv_body **slot;
  if (lua_type(L, idx) != LUA_TUSERDATA) return NULL;
  slot = (drv_body **)luaL_testudata(L, idx, DRV_BODY_MT);
  return slot ? *slot : NULL;
}

/* ---- reason phrases --------------------------------------------------- */

static const char *drv__reason(int status) {
  switch (status) {
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 206: return "Partial Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 303: return "See Other";
  case 304: return "Not Modified";
  case 307: return "Temporary Redirect";
  case 308: return "Permanent Redirect";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 409: return "Conflict";
  case 410: return "Gone";
  case 412: return "Precondition Failed";
  case 413: return "Payload Too Large";
  case 415: return "Unsupported Media Type";
  case 422: return "Unprocessable Entity";
  case 429: return "Too Many Requests";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return status < 400 ? "OK" : "Error";
  }
}

/* ---- requests ------------------------------------------------------------ */

static void drv__srv_finalize(drv_server *srv);

static void drv__sreq_unref(drv_sreq *r) {
  if (--r->refs > 0) return;
  free(r->outbuf);
  free(r->pend);
  free(r);
}

/* Wake the task waiting in res:start / res:write: true, or nil, "closed". */
static void drv__sreq_wake(drv_sreq *r, int ok) {
  lua_State *L;
  if (!r->waiting) return;
  r->waiting = 0;
  if (r->E->closing) return; /* the Lua state is going away: nobody to wake */
  L = drv__wait_stack(&r->wait);
  if (ok) {
    lua_pushboolean(L, 1);
    drv__wake(&r->wait, 1);
  } else {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    drv__wake(&r->wait, 2);
  }
}

static void drv__sreq_wait_cancel(drv_wait *w) {
  drv_sreq *r = (drv_sreq *)w;
  /* The send stays in flight (H2O owns the buffer); only the wait ends. */
  r->waiting = 0;
  drv__wake(w, 0);
}

/* Hand bytes to H2O.  buf is malloc'd (or NULL) and kept until the next
 * send or the end of the request.  May dispose of the request at once. */
static void drv__sreq_send(drv_sreq *r, char *buf, size_t len, h2o_send_state_t st) {
  h2o_iovec_t v = h2o_iovec_init(buf, len);
  h2o_req_t *req = r->req;
  free(r->outbuf);
  r->outbuf = buf;
  if (st == H2O_SEND_STATE_IN_PROGRESS) r->inflight = 1;
  h2o_send(req, len ? &v : NULL, len ? 1 : 0, st);
}

/* H2O wrote what we gave it and wants more. */
static void drv__sreq_proceed(h2o_generator_t *gen, h2o_req_t *req) {
  drv_sreq *r = (drv_sreq *)((char *)gen - offsetof(drv_sreq, gen));
  int what = r->pend_what;
  (void)req;
  r->inflight = 0;
  free(r->outbuf);
  r->outbuf = NULL;
  r->refs++;
  if (what != P_NONE) {
    char *buf = r->pend;
    size_t len = r->pend_len;
    r->pend = NULL;
    r->pend_len = 0;
    r->pend_what = P_NONE;
    drv__sreq_send(r, buf, len,
                   what == P_CHUNK ? H2O_SEND_STATE_IN_PROGRESS
                   : what == P_FINAL ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_ERROR);
  }
  if (!r->inflight) drv__sreq_wake(r, r->req != NULL);
  drv__sreq_unref(r);
}

/* End the response early: the client is gone (hard: shut the socket down
 * so that a write stuck on a dead peer fails now), the handler failed
 * after streaming began, or the server is going away.  The connection is
 * not kept alive. */
static void drv__sreq_abort(drv_sreq *r, int hard) {
  h2o_req_t *req = r->req;
  if (req == NULL) return;
  req->http1_is_persistent = 0;
  if (hard && r->conn && r->conn->sock) {
    int fd = h2o_socket_get_fd(r->conn->sock);
    if (fd >= 0) shutdown(fd, SHUT_RDWR);
  }
  r->refs++;
  if (r->state == S_NEW) {
    r->state = S_DONE;
    h2o_send_error_generic(req, 503, "Service Unavailable", "service unavailable\n",
                           H2O_SEND_ERROR_HTTP1_CLOSE_CONNECTION);
  } else if (r->state == S_STREAM) {
    r->state = S_DONE;
    drv__sreq_wake(r, 0); /* its chunk will not be sent */
    free(r->pend);
    r->pend = NULL;
    r->pend_len = 0;
    if (r->inflight) r->pend_what = P_ERROR;
    else drv__sreq_send(r, NULL, 0, H2O_SEND_STATE_ERROR);
  }
  drv__sreq_unref(r);
}

/* H2O disposes of the request's memory pool: the request is over. */
static void drv__sreq_disposed(void *p) {
  drv_sreq *r = *(drv_sreq **)p;
  drv_server *srv = r->srv;
  r->req = NULL;
  if (r->conn && r->conn->req == r) {
    r->conn->req = NULL;
    /* the connection's next request has a head of its own */
    r->conn->head_checked = r->conn->in_head = 0;
    r->conn->scan = 0;
  }
  r->conn = NULL;
  if (r->prev) r->prev->next = r->next; else srv->live = r->next;
  if (r->next) r->next->prev = r->prev;
  r->prev = r->next = NULL;
  srv->nlive--;
  r->srv = NULL;
  r->state = S_DONE;
  free(r->pend);
  r->pend = NULL;
  r->pend_what = P_NONE;
  /* A response the handler had not finished: the client went away (or the
   * server was closed under it).  A handler waiting in res:write learns it
   * from nil, "closed" and stops by itself; one waiting for anything else
   * (a store query, an event that may never come) is cancelled, so that it
   * cannot hold on forever. */
  if (r->waiting) {
    drv__sreq_wake(r, 0);
  } else if (!r->answered && r->task && !r->E->closing) {
    drv__task_cancel(r->task);
  }
  drv__sreq_unref(r);
}

/* ---- building the Lua side of a request --------------------------------- */

static void drv__conn_addr(drv_conn *c) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  int fd;
  if (c->addr_known) return;
  c->addr_known = 1;
  if (c->srv->is_unix) {
    strcpy(c->addr, "unix:");
    return;
  }
  fd = c->sock ? h2o_socket_get_fd(c->sock) : -1;
  if (fd < 0 || getpeername(fd, (struct sockaddr *)&ss, &len) != 0) return;
  if (ss.ss_family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    uv_ip4_name(a, c->addr, sizeof c->addr);
    c->port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    uv_ip6_name(a, c->addr, sizeof c->addr);
    c->port = ntohs(a->sin6_port);
  }
}

static void drv__setfield_iov(lua_State *L, const char *k, const char *s, size_t n) {
  lua_pushlstring(L, s ? s : "", s ? n : 0);
  lua_setfield(L, -2, k);
}

static int drv__answer_form(lua_State *L, int base, const char *who, int *statusp, int *hidxp, int *bidxp);
static void drv__respond(lua_State *L, drv_sreq *r, int status, int hidx, int bidx, const char *F);

/* Protected: answer r with what fast returned (arg 1: r, 2: status, 3:
 * headers, 4: body, as drv__answer_form found them). */
static int drv__fast_respond_lua(lua_State *L) {
  drv__respond(L, (drv_sreq *)lua_touserdata(L, 1), (int)lua_tointeger(L, 2), 3, 4, "drover.server: fast");
  return 0;
}

/* opts.fast(req), at the top of the stack with req: answered (1), or
 * nothing to say (0: the handler task takes the request).  It runs here,
 * in H2O's callback and outside any task, so it cannot wait; an error, or
 * values that are no answer, get the client a 500 and a line in the log
 * (there is no task to hand on_error to). */
static int drv__srv_fast(lua_State *L, drv_sreq *r, int env, int reqidx) {
  int base = lua_gettop(L) + 1, status, hidx, bidx;
  const char *m;
  lua_getfield(L, env, "fast");
  lua_pushvalue(L, reqidx);
  if (lua_pcall(L, 1, 3, 0) != LUA_OK) goto failed;
  if (lua_isnil(L, base)) {
    lua_settop(L, base - 1);
    return 0;
  }
  if (!drv__answer_form(L, base, "fast", &status, &hidx, &bidx)) goto failed;
  if (r->req == NULL || r->state != S_NEW) { /* it cannot have: no res object */
    lua_settop(L, base - 1);
    return 1;
  }
  lua_pushcfunction(L, drv__fast_respond_lua);
  lua_pushlightuserdata(L, r);
  lua_pushinteger(L, status);
  if (hidx) lua_pushvalue(L, hidx); else lua_pushnil(L);
  if (bidx) lua_pushvalue(L, bidx); else lua_pushnil(L);
  if (lua_pcall(L, 4, 0, 0) != LUA_OK) goto failed;
  lua_settop(L, base - 1);
  return 1;
failed:
  m = lua_tostring(L, -1);
  drv__log(r->E, "error", "drover.server: fast failed: %s", m ? m : "(error object is not a string)");
  lua_settop(L, base - 1);
  r->answered = 1;
  if (r->req && r->state == S_NEW) {
    r->state = S_DONE;
    h2o_send_error_500(r->req, "Internal Server Error", "internal server error\n", 0);
  }
  return 1;
}

/* Protected: build req and res, spawn dispatch(req, res) -- unless
 * opts.fast answers req first.  Arg 1: the drv_sreq (light userdata). */
static int drv__srv_start_lua(lua_State *L) {
  drv_sreq *r = (drv_sreq *)lua_touserdata(L, 1);
  h2o_req_t *req = r->req;
  drv_server *srv = r->srv;
  drv_sreq **slot;
  size_t i;
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->env_ref); /* 2 */
  lua_getfield(L, 2, "spawn");                      /* 3 */
  lua_getfield(L, 2, "dispatch");                   /* 4 */
  lua_createtable(L, 0, 11);                        /* 5: req */
  drv__setfield_iov(L, "method", req->method.base, req->method.len);
  drv__setfield_iov(L, "path", req->path_normalized.base, req->path_normalized.len);
  if (req->query_at != SIZE_MAX)
    drv__setfield_iov(L, "query", req->path.base + req->query_at + 1,
                      req->path.len - req->query_at - 1);
  else
    drv__setfield_iov(L, "query", "", 0);
  drv__setfield_iov(L, "target", req->input.path.base, req->input.path.len);
  drv__setfield_iov(L, "body", req->entity.base, req->entity.base ? req->entity.len : 0);
  lua_pushstring(L, req->version >= 0x101 ? "HTTP/1.1" : "HTTP/1.0");
  lua_setfield(L, 5, "version");
  /* drover.now()'s clock, when H2O had the whole request: whatever the
   * client did before sending it happened before this (a cache may serve
   * what it checked later than this) */
  lua_pushnumber(L, (double)r->time / 1e9);
  lua_setfield(L, 5, "time");
  if (r->conn) {
    drv__conn_addr(r->conn);
    lua_pushstring(L, r->conn->addr);
    lua_setfield(L, 5, "remote_addr");
    if (r->conn->port) {
      lua_pushinteger(L, r->conn->port);
      lua_setfield(L, 5, "remote_port");
    }
  }
  /* headers: lower-case names (H2O lowered them); repeats joined with ", "
   * ("; " for cookie).  H2O keeps Host and Content-Length out of the list. */
  lua_createtable(L, 0, (int)req->headers.size + 2);
  if (req->authority.base) {
    lua_pushlstring(L, req->authority.base, req->authority.len);
    lua_setfield(L, -2, "host");
  }
  if (req->entity.base) {
    lua_pushfstring(L, "%I", (lua_Integer)req->entity.len);
    lua_setfield(L, -2, "content-length");
  }
  for (i = 0; i != req->headers.size; i++) {
    h2o_header_t *h = req->headers.entries + i;
    lua_pushlstring(L, h->name->base, h->name->len);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, -3) == LUA_TSTRING) {
      int cookie = h->name->len == 6 && memcmp(h->name->base, "cookie", 6) == 0;
      lua_pushstring(L, cookie ? "; " : ", ");
      lua_pushlstring(L, h->value.base, h->value.len);
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushlstring(L, h->value.base, h->value.len);
    }
    lua_rawset(L, -3);
  }
  lua_setfield(L, 5, "headers");
  if (srv->has_fast) {
    int answered;
    r->refs++; /* the answer may dispose of the request at once */
    answered = drv__srv_fast(L, r, 2, 5);
    if (answered || r->req == NULL) {
      drv__sreq_unref(r);
      return 0;
    }
    r->refs--;
  }
  /* res: a full userdata holding the drv_sreq; uservalue 1 anchors the task */
  slot = (drv_sreq **)lua_newuserdatauv(L, sizeof *slot, 1); /* 6 */
  *slot = r;
  r->res = slot;
  r->refs++;
  lua_getfield(L, 2, "res_mt");
  lua_setmetatable(L, 6);
  lua_pushvalue(L, 3);
  lua_pushvalue(L, 4);
  lua_pushvalue(L, 5);
  lua_pushvalue(L, 6);
  lua_call(L, 3, 1); /* spawn(dispatch, req, res) -> task (7) */
  r->task = (drv_task *)lua_touserdata(L, 7);
  lua_setiuservalue(L, 6, 1);
  return 0;
}

static void drv__srv_watch_cb(uv_timer_t *t);

/* Build r's req (and res) and run opts.fast or spawn the handler's task,
 * in a protected call.  Out of memory in Lua: a 500 without the handler. */
static void drv__srv_start(drv_server *srv, drv_sreq *r) {
  lua_State *L = srv->E->L;
  int top = lua_gettop(L);
  if (lua_checkstack(L, 4)) {
    lua_pushcfunction(L, drv__srv_start_lua);
    lua_pushlightuserdata(L, r);
    if (lua_pcall(L, 1, 0, 0) == LUA_OK) {
      lua_settop(L, top);
      return;
    }
  }
  lua_settop(L, top);
  r->answered = 1;
  r->task = NULL;
  if (r->req && r->state == S_NEW) {
    r->state = S_DONE;
    h2o_send_error_500(r->req, "Internal Server Error", "internal server error\n",
                       H2O_SEND_ERROR_HTTP1_CLOSE_CONNECTION);
  }
}

/* With opts.fast, the requests H2O hands over during a pass of the loop
 * wait in srv->fast_head until it has read them all, and are then started
 * together.  Under load a pass reads tens of requests, and an answer that
 * rests on state checked after req.time (a cached page, valid while the
 * store's change mark stays the same) then takes one check per pass, not
 * one per request: every req.time of the batch is earlier than the first
 * check made for it.  The batch starts in the check phase, right after
 * the pass's reads; the idle handle, started with it, is for requests
 * that come in outside the poll phase (from a write's callback in the
 * pending phase, from a timer): it keeps the next poll from blocking with
 * them waiting, and the idle phase starts them.  A request gone meanwhile
 * (its client left, the server closed) is only let go of. */
static void drv__srv_fast_batch(drv_server *srv) {
  drv_sreq *r;
  while ((r = srv->fast_head) != NULL) {
    srv->fast_head = r->fast_next;
    if (srv->fast_head == NULL) srv->fast_tail = NULL;
    r->fast_next = NULL;
    if (r->req && r->state == S_NEW && !srv->E->closing && !srv->finalized) drv__srv_start(srv, r);
    drv__sreq_unref(r);
  }
  uv_check_stop(&srv->fast_check);
  uv_idle_stop(&srv->fast_idle);
}

static void drv__srv_fast_check_cb(uv_check_t *h) { drv__srv_fast_batch((drv_server *)h->data); }
static void drv__srv_fast_idle_cb(uv_idle_t *h) { drv__srv_fast_batch((drv_server *)h->data); }

/* Let go of the requests waiting for opts.fast (the server is finalized:
 * H2O disposed of every one of them). */
static void drv__srv_fast_drop(drv_server *srv) {
  drv_sreq *r;
  while ((r = srv->fast_head) != NULL) {
    srv->fast_head = r->fast_next;
    r->fast_next = NULL;
    drv__sreq_unref(r);
  }
  srv->fast_tail = NULL;
}

/* H2O has a complete request for us. */
static int drv__srv_on_req(h2o_handler_t *self, h2o_req_t *req) {
  drv_server *srv = ((drv_handler *)self)->srv;
  drv_engine *E = srv->E;
  h2o_socket_t *sock = req->conn->callbacks->get_socket ? req->conn->callbacks->get_socket(req->conn) : NULL;
  drv_sreq *r, **slot;
  if (E->closing || srv->finalized) {
    h2o_send_error_503(req, "Service Unavailable", "service unavailable\n",
                       H2O_SEND_ERROR_HTTP1_CLOSE_CONNECTION);
    return 0;
  }
  r = (drv_sreq *)calloc(1, sizeof *r);
  if (r == NULL) {
    h2o_send_error_503(req, "Service Unavailable", "out of memory\n", H2O_SEND_ERROR_HTTP1_CLOSE_CONNECTION);
    return 0;
  }
  r->E = E;
  r->srv = srv;
  r->req = req;
  r->refs = 1;
  r->time = uv_hrtime();
  r->conn = sock ? (drv_conn *)sock->on_close.data : NULL;
  if (r->conn) r->conn->req = r;
  r->is_head = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD"));
  r->gen.proceed = drv__sreq_proceed;
  r->gen.stop = NULL; /* drv__sreq_disposed does the work */
  slot = (drv_sreq **)h2o_mem_alloc_shared(&req->pool, sizeof *slot, drv__sreq_disposed);
  *slot = r;
  r->next = srv->live;
  if (srv->live) srv->live->prev = r;
  srv->live = r;
  srv->nlive++;
  srv->served++;
  if (!uv_is_active((uv_handle_t *)&srv->watch))
    uv_timer_start(&srv->watch, drv__srv_watch_cb, DRV_WATCH_MS, DRV_WATCH_MS);
  if (srv->has_fast) { /* with the rest of this pass's requests: drv__srv_fast_batch */
    r->refs++;
    if (srv->fast_tail) srv->fast_tail->fast_next = r; else srv->fast_head = r;
    srv->fast_tail = r;
    uv_check_start(&srv->fast_check, drv__srv_fast_check_cb);
    uv_idle_start(&srv->fast_idle, drv__srv_fast_idle_cb);
    return 0;
  }
  drv__srv_start(srv, r);
  return 0;
}

/* ---- the client-gone watch ------------------------------------------------ */

static void drv__srv_watch_cb(uv_timer_t *t) {
  drv_server *srv = (drv_server *)t->data;
  drv_sreq *r;
  size_t n = 0, i;
  if (srv->live == NULL) {
    uv_timer_stop(t);
    return;
  }
  if (srv->pcap < (size_t)srv->nlive) {
    size_t cap = (size_t)srv->nlive * 2;
    struct pollfd *pf = (struct pollfd *)realloc(srv->pfds, cap * sizeof *pf);
    drv_sreq **pr;
    if (pf == NULL) return;
    srv->pfds = pf;
    pr = (drv_sreq **)realloc(srv->preqs, cap * sizeof *pr);
    if (pr == NULL) return;
    srv->preqs = pr;
    srv->pcap = cap;
  }
  for (r = srv->live; r && n < srv->pcap; r = r->next) {
    int fd;
    if (r->state == S_DONE || r->conn == NULL || r->conn->sock == NULL) continue;
    fd = h2o_socket_get_fd(r->conn->sock);
    if (fd < 0) continue;
    srv->pfds[n].fd = fd;
    srv->pfds[n].events = POLLRDHUP;
    srv->pfds[n].revents = 0;
    srv->preqs[n++] = r;
  }
  if (n == 0 || poll(srv->pfds, (nfds_t)n, 0) <= 0) return;
  for (i = 0; i < n; i++) {
    if (srv->pfds[i].revents & (POLLRDHUP | POLLHUP | POLLERR)) {
      r = srv->preqs[i];
      /* Aborting one request never disposes of another one: the
       * remaining pointers stay valid. */
      if (r->req) drv__sreq_abort(r, 1);
    }
  }
}

/* ---- connections ------------------------------------------------------------ */

static void drv__conn_freed(uv_handle_t *h) {
  drv_conn *c = (drv_conn *)h;
  drv_server *srv = c->srv;
  free(c->refusal);
  free(c);
  if (srv && srv->closing && !srv->finalized && srv->nconns == 0) drv__srv_finalize(srv);
}

/* H2O closed the socket (synchronously, inside its own close path). */
static void drv__conn_sock_closed(void *data) {
  drv_conn *c = (drv_conn *)data;
  drv_server *srv = c->srv;
  c->sock = NULL;
  h2o_timeout_unlink(&c->sniff);
  if (c->prev) c->prev->next = c->next; else srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
  srv->nconns--;
}

/* ---- TLS ---------------------------------------------------------------------- */

/* What a plain-HTTP client of a TLS port reads instead of a dropped
 * connection.  Static: H2O writes from it after we return. */
#define DRV_TLS_PLAIN_BODY "this server speaks HTTPS only: use an https:// URL to reach it\n"
static const char drv__tls_plain_answer[] =
    "HTTP/1.1 400 Bad Request\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Length: 63\r\n"
    "Connection: close\r\n"
    "\r\n" DRV_TLS_PLAIN_BODY;
typedef char drv__tls_plain_length_is_63[sizeof DRV_TLS_PLAIN_BODY - 1 == 63 ? 1 : -1];

static void drv__tls_plain_answered(h2o_socket_t *sock, const char *err) {
  (void)err;
  h2o_socket_close(sock);
}

/* A TLS connection sent nothing within the handshake timeout. */
static void drv__tls_sniff_timeout(h2o_timeout_entry_t *e) {
  drv_conn *c = (drv_conn *)((char *)e - offsetof(drv_conn, sniff));
  if (c->sock) h2o_socket_close(c->sock);
}

/* The first bytes of a connection to a TLS server.  A TLS connection opens
 * with a handshake record (0x16); a letter is an HTTP method: that client
 * meant http:// and gets a 400 that says so.  Anything else goes to H2O,
 * whose handshake fails it. */
static void drv__tls_sniff(h2o_socket_t *sock, const char *err) {
  drv_conn *c = (drv_conn *)sock->on_close.data;
  unsigned char first;
  if (err != NULL) {
    h2o_socket_close(sock);
    return;
  }
  if (sock->input->size == 0) return;
  h2o_timeout_unlink(&c->sniff);
  h2o_socket_read_stop(sock);
  first = (unsigned char)sock->input->bytes[0];
  if (first >= 'A' && first <= 'Z') {
    h2o_iovec_t v = h2o_iovec_init(drv__tls_plain_answer, sizeof drv__tls_plain_answer - 1);
    h2o_socket_write(sock, &v, 1, drv__tls_plain_answered);
    return;
  }
  h2o_accept(&c->srv->accept_ctx, sock); /* H2O takes the bytes read so far as the handshake's */
}

/* The key of a TLS server may not ask for a passphrase: OpenSSL's default
 * would prompt on the terminal, which a daemon does not have. */
static int drv__tls_no_passphrase(char *buf, int size, int rwflag, void *u) {
  (void)buf; (void)size; (void)rwflag;
  *(int *)u = 1;
  return -1;
}

/* OpenSSL's reason for the last failure, for a message. */
static const char *drv__tls_reason(void) {
  const char *why = ERR_reason_error_string(ERR_peek_error()); /* the first: the cause */
  return why ? why : "unknown error";
}

/* A file can be read (the message OpenSSL gives for a missing file is
 * "system lib"); 0 or -1 with errno. */
static int drv__readable(const char *path) {
  FILE *f = fopen(path, "r");
  int ok;
  if (f == NULL) return -1;
  ok = getc(f) != EOF || !ferror(f);
  fclose(f);
  return ok ? 0 : -1;
}

/* An SSL_CTX serving `cert` (PEM: the certificate, then any intermediate
 * ones) with `key` (PEM, unencrypted).  NULL with a message in msg on
 * failure. */
static SSL_CTX *drv__tls_ctx(const char *cert, const char *key, char *msg, size_t msglen) {
  const char *F = "drover.server.listen";
  SSL_CTX *ctx;
  int asked = 0;
  if (drv__readable(cert) != 0) {
    snprintf(msg, msglen, "%s: tls.cert: cannot read %s: %s", F, cert, strerror(errno));
    return NULL;
  }
  if (drv__readable(key) != 0) {
    snprintf(msg, msglen, "%s: tls.key: cannot read %s: %s", F, key, strerror(errno));
    return NULL;
  }
  ERR_clear_error();
  ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == NULL) {
    snprintf(msg, msglen, "%s: tls: cannot create a TLS context: %s", F, drv__tls_reason());
    return NULL;
  }
  /* TLS 1.3 only, and no session tickets: then the handshake's last write
   * is the server's first flight, sent while the handshake is still in
   * progress.  H2O 2.2 cannot close a socket whose write completes a
   * handshake (TLS 1.2's last flight, 1.3's tickets) before libuv finished
   * it: its close would write again with the one write request in use.
   * drv__conn_force_close relies on this.  Every client drover talks to
   * (libcurl, browsers, Go, Python) speaks 1.3. */
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_default_passwd_cb(ctx, drv__tls_no_passphrase);
  SSL_CTX_set_default_passwd_cb_userdata(ctx, &asked);
  /* The key first: a certificate loaded next that does not match it
   * unloads it, and the check below says so plainly. */
  if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
    if (asked)
      snprintf(msg, msglen, "%s: tls.key: %s is protected by a passphrase (not supported: "
               "decrypt it with openssl pkey)", F, key);
    else
      snprintf(msg, msglen, "%s: tls.key: %s holds no usable PEM private key (OpenSSL: %s)", F, key,
               drv__tls_reason());
  } else if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
    snprintf(msg, msglen, "%s: tls.cert: %s holds no usable PEM certificate (OpenSSL: %s)", F, cert,
             drv__tls_reason());
  } else if (SSL_CTX_check_private_key(ctx) != 1) {
    snprintf(msg, msglen, "%s: tls.key: %s is not the key of the certificate in %s", F, key, cert);
  } else {
    SSL_CTX_set_default_passwd_cb(ctx, NULL);
    SSL_CTX_set_default_passwd_cb_userdata(ctx, NULL);
    ERR_clear_error();
    return ctx;
  }
  ERR_clear_error();
  SSL_CTX_free(ctx);
  return NULL;
}

/* ---- the header phase: check_head ---------------------------------------------- */

/* H2O 2.2's HTTP/1 reads a request's whole body before it hands the
 * request over: a server that wants to refuse a body (no token, too
 * large for its path) would have buffered it first, and a few clients
 * sending large bodies at once take the memory.  opts.check_head is asked
 * as soon as a request's head is in, before H2O has seen it, and may
 * refuse it.  H2O has no hook there, so each connection's read callback
 * is wrapped (drv__conn_on_read): H2O sets it again whenever it starts
 * reading, and a prepare handle wraps it again before every poll, the
 * only phase in which libuv reads.  Until the request is disposed of,
 * the input buffer starts with its head (H2O consumes a request's bytes
 * when it is done), so the head is looked at there.  The check is a
 * pre-filter for memory: the handler still sees (and checks) the request
 * as before.  A refused request gets the answer, its connection is shut
 * for writing, and what the client still sends is dropped as it comes
 * (up to DRV_DISCARD_MAX bytes, then no longer read) until it closes or
 * H2O's request timeout ends the connection. */

static void drv__conn_on_read(h2o_socket_t *sock, const char *err);
static int drv__tchar(int c);

static void drv__conn_wrap(drv_conn *c) {
  h2o_socket_t *sock = c->sock;
  if (sock == NULL || sock->_cb.read == NULL || sock->_cb.read == drv__conn_on_read ||
      sock->_cb.read == drv__tls_sniff)
    return;
  c->h2o_read = sock->_cb.read;
  sock->_cb.read = drv__conn_on_read;
}

static void drv__srv_wrap_cb(uv_prepare_t *p) {
  drv_server *srv = (drv_server *)p->data;
  drv_conn *c;
  for (c = srv->conns; c; c = c->next) drv__conn_wrap(c);
}

/* The end of the head at the start of c's input (after any empty lines):
 * its length, 0 if it is not complete (yet), -1 if it is not complete
 * within DRV_HEAD_MAX.  The search resumes where the last one stopped
 * (c->scan), so a head that comes a byte at a time costs its length, not
 * its length squared. */
static long drv__head_end(drv_conn *c, const char *buf, size_t len) {
  size_t i = c->scan, n = len < DRV_HEAD_MAX ? len : DRV_HEAD_MAX;
  if (!c->in_head) {
    while (i < n && (buf[i] == '\r' || buf[i] == '\n')) i++;
    c->in_head = i < n;
  }
  for (; i < n; i++) {
    if (buf[i] != '\n') continue;
    if (i + 1 == n || (buf[i + 1] == '\r' && i + 2 == n)) break; /* not known yet */
    if (buf[i + 1] == '\n') return (long)(i + 2);
    if (buf[i + 1] == '\r' && buf[i + 2] == '\n') return (long)(i + 3);
  }
  c->scan = i;
  return len >= DRV_HEAD_MAX ? -1 : 0;
}

/* The next line of [*p, end): its start and length without CR LF. */
static const char *drv__head_line(const char **p, const char *end, size_t *n) {
  const char *s = *p, *nl = (const char *)memchr(s, '\n', (size_t)(end - s));
  if (nl == NULL) nl = end;
  *p = nl < end ? nl + 1 : end;
  *n = (size_t)(nl - s);
  if (*n && s[*n - 1] == '\r') (*n)--;
  return s;
}

/* Protected: parse the head (arg 2: light userdata of the bytes, arg 3:
 * its length), ask check_head (env at arg 1).  Returns nothing when the
 * request goes on, or the whole answer (status line to body) to send. */
static int drv__srv_head_lua(lua_State *L) {
  const char *p = (const char *)lua_touserdata(L, 2), *end = p + lua_tointeger(L, 3), *line, *sp;
  drv_conn *c = (drv_conn *)lua_touserdata(L, 4);
  size_t n, i, qat = SIZE_MAX;
  int has_body = 0, status;
  h2o_mem_pool_t pool;
  h2o_iovec_t norm;
  size_t *norm_index = NULL;
  luaL_Buffer b;
  while (p < end && (*p == '\r' || *p == '\n')) p++; /* H2O skips empty lines before a request */
  line = drv__head_line(&p, end, &n);
  lua_getfield(L, 1, "check_head"); /* 5 */
  lua_createtable(L, 0, 8);         /* 6: head */
  sp = (const char *)memchr(line, ' ', n);
  if (sp == NULL) return 0; /* malformed: H2O answers it */
  lua_pushlstring(L, line, (size_t)(sp - line));
  lua_setfield(L, 6, "method");
  n -= (size_t)(sp - line) + 1;
  line = sp + 1;
  {
    const char *tend = (const char *)memchr(line, ' ', n);
    size_t tlen = tend ? (size_t)(tend - line) : n;
    lua_pushlstring(L, line, tlen);
    lua_setfield(L, 6, "target");
    h2o_mem_init_pool(&pool);
    norm = h2o_url_normalize_path(&pool, line, tlen, &qat, &norm_index);
    lua_pushlstring(L, norm.base, norm.len);
    lua_setfield(L, 6, "path");
    if (qat != SIZE_MAX) lua_pushlstring(L, line + qat + 1, tlen - qat - 1);
    else lua_pushliteral(L, "");
    lua_setfield(L, 6, "query");
    h2o_mem_clear_pool(&pool);
  }
  drv__conn_addr(c);
  if (c->addr[0]) {
    lua_pushstring(L, c->addr);
    lua_setfield(L, 6, "remote_addr");
  }
  lua_newtable(L); /* 7: headers, as req.headers */
  while (p < end) {
    const char *colon, *v, *ve;
    char name[128];
    line = drv__head_line(&p, end, &n);
    if (n == 0) break;
    colon = (const char *)memchr(line, ':', n);
    if (colon == NULL || colon == line || (size_t)(colon - line) >= sizeof name) continue;
    for (i = 0; line + i < colon; i++) name[i] = (char)(line[i] >= 'A' && line[i] <= 'Z' ? line[i] + 32 : line[i]);
    v = colon + 1;
    ve = line + n;
    while (v < ve && (*v == ' ' || *v == '\t')) v++;
    while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
    if ((i == 14 && memcmp(name, "content-length", 14) == 0 && !(ve - v == 1 && *v == '0')) ||
        (i == 17 && memcmp(name, "transfer-encoding", 17) == 0))
      has_body = 1;
    lua_pushlstring(L, name, i);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, 7) == LUA_TSTRING) {
      lua_pushstring(L, i == 6 && memcmp(name, "cookie", 6) == 0 ? "; " : ", ");
      lua_pushlstring(L, v, (size_t)(ve - v));
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushlstring(L, v, (size_t)(ve - v));
    }
    lua_rawset(L, 7);
  }
  lua_setfield(L, 6, "headers");
  if (!has_body) return 0; /* nothing to buffer: the handler decides */
  lua_call(L, 1, 3);       /* check_head(head) -> status, headers, body */
  if (lua_isnil(L, 5)) return 0;
  if (!lua_isinteger(L, 5) || (status = (int)lua_tointeger(L, 5)) < 400 || status > 599)
    return luaL_error(L, "drover.server: check_head returned %s (nil or an error status, 400-599, expected)",
                      luaL_typename(L, 5));
  if (!lua_isnil(L, 6) && !lua_istable(L, 6))
    return luaL_error(L, "drover.server: check_head returned headers of type %s (table expected)",
                      luaL_typename(L, 6));
  if (!lua_isnil(L, 7) && !lua_isstring(L, 7))
    return luaL_error(L, "drover.server: check_head returned a body of type %s (string expected)",
                      luaL_typename(L, 7));
  luaL_buffinit(L, &b);
  lua_pushfstring(L, "HTTP/1.1 %d %s\r\nconnection: close\r\ncontent-length: %d\r\n", status,
                  drv__reason(status), (int)(lua_isnil(L, 7) ? 0 : luaL_len(L, 7)));
  luaL_addvalue(&b);
  if (lua_istable(L, 6)) {
    lua_pushnil(L);
    while (lua_next(L, 6)) {
      size_t kl, vl;
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kl) : NULL;
      const char *hv = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &vl) : NULL;
      int ok = k && hv && kl > 0;
      for (i = 0; ok && i < kl; i++) ok = drv__tchar((unsigned char)k[i]);
      for (i = 0; ok && i < vl; i++) ok = hv[i] != '\r' && hv[i] != '\n' && hv[i] != '\0';
      if (!ok) return luaL_error(L, "drover.server: check_head returned a bad header");
      if (!(kl == 14 && strncasecmp(k, "content-length", 14) == 0) &&
          !(kl == 10 && strncasecmp(k, "connection", 10) == 0)) {
        luaL_addlstring(&b, k, kl);
        luaL_addstring(&b, ": ");
        luaL_addlstring(&b, hv, vl);
        luaL_addstring(&b, "\r\n");
      }
      lua_pop(L, 1);
    }
  }
  luaL_addstring(&b, "\r\n");
  if (!lua_isnil(L, 7)) {
    lua_pushvalue(L, 7);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
  return 1;
}

/* End a refused connection: H2O closes it (and frees its side) on a read
 * error.  Never while our answer is being written. */
static void drv__refused_close(drv_conn *c, h2o_socket_t *sock, const char *err) {
  h2o_socket_cb next = c->h2o_read;
  sock->_cb.read = next;
  next(sock, err);
}

static void drv__refusal_written(h2o_socket_t *sock, const char *err) {
  drv_conn *c = (drv_conn *)sock->on_close.data;
  int fd;
  if (err != NULL || c->close_after_write) {
    drv__refused_close(c, sock, err ? err : h2o_socket_error_closed);
    return;
  }
  /* the answer is out: say so with a FIN (plain TCP; TLS clients take the
   * length), and keep reading, dropping, so the client reads the answer
   * instead of a reset */
  fd = sock->ssl == NULL ? h2o_socket_get_fd(sock) : -1;
  if (fd >= 0) shutdown(fd, SHUT_WR);
}

/* Whether the head [p, p + len) announces a body (a Content-Length other
 * than 0, or a Transfer-Encoding): the same test drv__srv_head_lua makes,
 * done first in C so that a request without a body (nearly all of them)
 * builds no Lua table. */
static int drv__head_has_body(const char *p, size_t len) {
  const char *end = p + len, *line;
  size_t n;
  while (p < end && (*p == '\r' || *p == '\n')) p++;
  drv__head_line(&p, end, &n); /* the request line */
  while (p < end) {
    const char *colon, *v, *ve;
    line = drv__head_line(&p, end, &n);
    if (n == 0) break;
    colon = (const char *)memchr(line, ':', n);
    if (colon == NULL) continue;
    v = colon + 1;
    ve = line + n;
    while (v < ve && (*v == ' ' || *v == '\t')) v++;
    while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
    if (colon - line == 14 && strncasecmp(line, "content-length", 14) == 0 && !(ve - v == 1 && *v == '0'))
      return 1;
    if (colon - line == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) return 1;
  }
  return 0;
}

/* The head of a request on c is in: ask check_head.  1 if it refused
 * (the answer is on its way), 0 to go on. */
static int drv__conn_check_head(drv_conn *c) {
  drv_server *srv = c->srv;
  h2o_socket_t *sock = c->sock;
  lua_State *L = srv->E->L;
  long len = drv__head_end(c, sock->input->bytes, sock->input->size);
  int top, st;
  size_t n;
  const char *answer;
  h2o_iovec_t v;
  if (len == 0) return 0;
  c->head_checked = 1;
  if (len < 0 || srv->E->closing || srv->finalized || !lua_checkstack(L, 12)) return 0;
  if (!drv__head_has_body(sock->input->bytes, (size_t)len)) return 0; /* nothing to buffer */
  top = lua_gettop(L);
  lua_pushcfunction(L, drv__srv_head_lua);
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->env_ref);
  lua_pushlightuserdata(L, sock->input->bytes);
  lua_pushinteger(L, len);
  lua_pushlightuserdata(L, c);
  st = lua_pcall(L, 4, 1, 0);
  if (st != LUA_OK) {
    /* a check that fails refuses: a server error, never a way past it */
    const char *m = lua_tostring(L, -1);
    drv__log(srv->E, "error", "drover.server: check_head failed: %s", m ? m : "?");
    lua_settop(L, top);
    lua_pushliteral(L, "HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\ncontent-length: 22\r\n"
                       "content-type: text/plain; charset=utf-8\r\n\r\ninternal server error\n");
  }
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_settop(L, top);
    return 0;
  }
  answer = lua_tolstring(L, -1, &n);
  free(c->refusal);
  c->refusal = (char *)malloc(n);
  if (c->refusal) memcpy(c->refusal, answer, n);
  lua_settop(L, top);
  c->refused = 1;
  h2o_buffer_consume(&sock->input, sock->input->size);
  if (c->refusal == NULL) return 1; /* out of memory: dropped without a word */
  v = h2o_iovec_init(c->refusal, n);
  h2o_socket_write(sock, &v, 1, drv__refusal_written);
  return 1;
}

/* Every read of a connection once H2O has it (see the section's top). */
static void drv__conn_on_read(h2o_socket_t *sock, const char *err) {
  drv_conn *c = (drv_conn *)sock->on_close.data;
  h2o_socket_cb next = c->h2o_read;
  if (c->refused) {
    if (err == NULL) {
      c->discarded += sock->input->size;
      h2o_buffer_consume(&sock->input, sock->input->size);
      /* Enough: stop reading.  The client's sending stalls on full
       * buffers, so it reads the answer (a reset would lose it); H2O's
       * request timeout, still running since H2O saw no head, ends the
       * connection if the client does not. */
      if (c->discarded > DRV_DISCARD_MAX) h2o_socket_read_stop(sock);
      return;
    }
    if (sock->_cb.write != NULL) { /* the answer is still going out */
      c->close_after_write = 1;
      h2o_socket_read_stop(sock);
      return;
    }
    drv__refused_close(c, sock, err ? err : h2o_socket_error_closed);
    return;
  }
  if (err == NULL && c->req == NULL && !c->head_checked && drv__conn_check_head(c)) return;
  next(sock, err);
  if (c->sock == sock) drv__conn_wrap(c); /* H2O may have started reading afresh */
}

#define DRV_BUSY_BODY "too many connections: try again later\n"
static const char drv__busy_answer[] =
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Length: 38\r\n"
    "Retry-After: 1\r\n"
    "Connection: close\r\n"
    "\r\n" DRV_BUSY_BODY;
typedef char drv__busy_length_is_38[sizeof DRV_BUSY_BODY - 1 == 38 ? 1 : -1];

static void drv__srv_on_accept(uv_stream_t *l, int status) {
  drv_server *srv = (drv_server *)l->data;
  drv_conn *c;
  int r;
  if (status != 0 || srv->closing) return;
  c = (drv_conn *)calloc(1, sizeof *c);
  if (c == NULL) return;
  if (srv->is_unix) r = uv_pipe_init(srv->E->loop, &c->h.pipe, 0);
  else r = uv_tcp_init(srv->E->loop, &c->h.tcp);
  if (r != 0) {
    free(c);
    return;
  }
  if (uv_accept(l, &c->h.stream) != 0) {
    uv_close(&c->h.handle, drv__conn_freed);
    return;
  }
  if (srv->nconns >= srv->max_conns) {
    /* Over the cap: a plain-HTTP client reads a 503 (written straight to
     * the socket: a few bytes into an empty buffer), a TLS one a close. */
    uv_os_fd_t fd;
    srv->turned_away++;
    if (!srv->ssl_ctx && uv_fileno(&c->h.handle, &fd) == 0) {
      ssize_t w = send(fd, drv__busy_answer, sizeof drv__busy_answer - 1, MSG_DONTWAIT | MSG_NOSIGNAL);
      (void)w;
      shutdown(fd, SHUT_WR);
    }
    uv_close(&c->h.handle, drv__conn_freed);
    return;
  }
  /* Streamed chunks are small writes in a row: do not let Nagle hold
   * them back waiting for the client's delayed ACK. */
  if (!srv->is_unix) uv_tcp_nodelay(&c->h.tcp, 1);
  c->srv = srv;
  c->sock = h2o_uv_socket_create(&c->h.stream, drv__conn_freed);
  c->sock->on_close.cb = drv__conn_sock_closed;
  c->sock->on_close.data = c;
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  srv->nconns++;
  if (srv->ssl_ctx) {
    c->sniff.cb = drv__tls_sniff_timeout;
    h2o_timeout_link(srv->ctx.loop, &srv->ctx.handshake_timeout, &c->sniff);
    h2o_socket_read_start(c->sock, drv__tls_sniff);
  } else {
    h2o_accept(&srv->accept_ctx, c->sock);
  }
}

static void drv__write_ignored(h2o_socket_t *sock, const char *err) { (void)sock; (void)err; }

/* Neither reading nor writing, a request may still wait for H2O: a send
 * with nothing to write (a chunk in flight is one) puts its next step off
 * to the loop's next pass, on the context's zero timeout.  Take the steps
 * waiting there now -- only those: one may put off another. */
static void drv__run_deferred(h2o_context_t *ctx) {
  h2o_linklist_t now;
  h2o_linklist_init_anchor(&now);
  h2o_linklist_insert_list(&now, &ctx->zero_timeout._entries);
  while (!h2o_linklist_is_empty(&now)) {
    h2o_timeout_entry_t *e = H2O_STRUCT_FROM_MEMBER(h2o_timeout_entry_t, _link, now.next);
    h2o_linklist_unlink(&e->_link);
    e->registered_at = 0;
    e->cb(e);
  }
}

/* Close one connection now, whatever H2O is doing with it, through H2O's
 * own callbacks so that it frees what it holds.  H2O 2.2 has no public
 * "close this connection": its HTTP/1 code closes a connection when a read
 * or a write reports an error, so that is what we report. */
static void drv__conn_force_close(drv_conn *c) {
  int guard;
  for (guard = 0; guard < 8 && c->sock != NULL; guard++) {
    h2o_socket_t *sock = c->sock;
    drv_sreq *r = c->req;
    if (r && r->req) {
      r->req->http1_is_persistent = 0;
      r->answered = 1;
      if (r->state != S_DONE) {
        /* a 503, or the end of a streamed response: written now (or the
         * connection closes at once), or queued behind the chunk in flight */
        drv__sreq_abort(r, 0);
        continue;
      }
    }
    if (sock->_cb.write != NULL && sock->ssl != NULL) {
      /* TLS: the write is still libuv's.  With a callback still set,
       * H2O's TLS close skips its close_notify (a second write on a socket
       * that has one write request) and frees the socket at once; the
       * callback is one that does nothing, in case the write finishes. */
      h2o_socket_cb cb = sock->_cb.write;
      sock->_cb.write = drv__write_ignored;
      cb(sock, h2o_socket_error_closed);
    } else if (sock->_cb.write != NULL) {
      h2o_socket_cb cb = sock->_cb.write;
      sock->_cb.write = NULL;
      cb(sock, h2o_socket_error_closed);
    } else if (sock->_cb.read != NULL) {
      sock->_cb.read(sock, h2o_socket_error_closed);
    } else if (c->refused) { /* refused, no longer read (drv__conn_on_read) */
      drv__refused_close(c, sock, h2o_socket_error_closed);
    } else if (!h2o_linklist_is_empty(&c->srv->ctx.zero_timeout._entries)) {
      drv__run_deferred(&c->srv->ctx);
    } else {
      break;
    }
  }
}

/* ---- server lifetime ---------------------------------------------------------- */

static void drv__srv_reaped(uv_handle_t *h) {
  drv_server *srv = (drv_server *)h->data;
  if (srv->owner) *srv->owner = NULL;
  free(srv->unix_path);
  if (srv->ssl_ctx) SSL_CTX_free(srv->ssl_ctx);
  free(srv->pfds);
  free(srv->preqs);
  free(srv);
}

/* First close stage.  Every handle closed together with the watch timer
 * (H2O's timers, its async handle) is finished in the same loop pass; a
 * handle closed now is finished in the next one, when freeing is safe. */
static void drv__srv_watch_closed(uv_handle_t *h) {
  drv_server *srv = (drv_server *)h->data;
  /* (h->loop, not srv->E->loop: with a host-owned loop the engine may be
   * gone by now) */
  uv_idle_init(h->loop, &srv->reaper);
  srv->reaper.data = srv;
  uv_close((uv_handle_t *)&srv->reaper, drv__srv_reaped);
}

static void drv__srv_listener_closed(uv_handle_t *h) { (void)h; }

static void drv__srv_listener_freed(uv_handle_t *h) {
  drv_server *srv = (drv_server *)h->data;
  free(srv->unix_path);
  if (srv->ssl_ctx) SSL_CTX_free(srv->ssl_ctx);
  free(srv);
}

/* h2o_context_dispose without its trailing uv_run(): running the loop from
 * here would resume drover tasks from inside whatever called us (libuv
 * forbids nested uv_run from callbacks in any case).  The closed handles
 * are finished by the loop's next pass instead. */
static void drv__ctx_dispose(h2o_context_t *ctx) {
  h2o_globalconf_t *config = ctx->globalconf;
  size_t i, j;
  for (i = 0; config->hosts[i] != NULL; ++i) {
    h2o_hostconf_t *hostconf = config->hosts[i];
    for (j = 0; j != hostconf->paths.size; ++j)
      h2o_context_dispose_pathconf_context(ctx, hostconf->paths.entries + j);
    h2o_context_dispose_pathconf_context(ctx, &hostconf->fallback_path);
  }
  free(ctx->_pathconfs_inited.entries);
  free(ctx->_module_configs);
  h2o_timeout_dispose(ctx->loop, &ctx->zero_timeout);
  h2o_timeout_dispose(ctx->loop, &ctx->one_sec_timeout);
  h2o_timeout_dispose(ctx->loop, &ctx->hundred_ms_timeout);
  h2o_timeout_dispose(ctx->loop, &ctx->handshake_timeout);
  h2o_timeout_dispose(ctx->loop, &ctx->http1.req_timeout);
  h2o_timeout_dispose(ctx->loop, &ctx->http2.idle_timeout);
  h2o_timeout_dispose(ctx->loop, &ctx->http2.graceful_shutdown_timeout);
  h2o_timeout_dispose(ctx->loop, &ctx->proxy.io_timeout);
  h2o_filecache_destroy(ctx->filecache);
  ctx->filecache = NULL;
  for (i = 0; i != ctx->storage.size; ++i) {
    h2o_context_storage_item_t *item = ctx->storage.entries + i;
    if (item->dispose != NULL) item->dispose(item->data);
  }
  free(ctx->storage.entries);
  h2o_multithread_unregister_receiver(ctx->queue, &ctx->receivers.hostinfo_getaddr);
  h2o_multithread_destroy_queue(ctx->queue);
  if (ctx->_timestamp_cache.value != NULL) h2o_mem_release_shared(ctx->_timestamp_cache.value);
}

/* No connection is left: release H2O and Lua state, then free in two
 * loop passes (see drv__srv_watch_closed). */
static void drv__srv_finalize(drv_server *srv) {
  if (srv->finalized) return;
  srv->finalized = 1;
  drv__res_unlink(&srv->res);
  if (!uv_is_closing(&srv->listener.handle)) uv_close(&srv->listener.handle, drv__srv_listener_closed);
  uv_timer_stop(&srv->watch);
  uv_close((uv_handle_t *)&srv->wrap, NULL); /* finished with the watch, in the same pass */
  uv_close((uv_handle_t *)&srv->fast_check, NULL);
  uv_close((uv_handle_t *)&srv->fast_idle, NULL);
  drv__srv_fast_drop(srv);
  uv_close((uv_handle_t *)&srv->watch, drv__srv_watch_closed);
  drv__ctx_dispose(&srv->ctx);
  h2o_config_dispose(&srv->config);
  if (!srv->E->closing && srv->env_ref != LUA_NOREF) {
    luaL_unref(srv->E->L, LUA_REGISTRYINDEX, srv->env_ref);
    srv->env_ref = LUA_NOREF;
  }
}

/* Stop accepting; close idle connections; let the others finish their
 * current request (answered with Connection: close). */
static void drv__srv_shutdown(drv_server *srv) {
  drv_conn *c, *next;
  if (srv->closing) return;
  srv->closing = 1;
  srv->ctx.shutdown_requested = 1;
  if (!uv_is_closing(&srv->listener.handle)) uv_close(&srv->listener.handle, drv__srv_listener_closed);
  if (srv->is_unix && srv->unix_path) unlink(srv->unix_path);
  for (c = srv->conns; c; c = next) {
    h2o_socket_t *sock = c->sock;
    next = c->next;
    if (c->req && c->req->req) {
      c->req->req->http1_is_persistent = 0;
    } else if (sock && sock->_cb.read != NULL && sock->input->size == 0) {
      /* idle keep-alive connection: H2O closes it on a read error */
      sock->_cb.read(sock, h2o_socket_error_closed);
    } else if (sock && c->refused && sock->_cb.read == NULL && sock->_cb.write == NULL) {
      drv__refused_close(c, sock, h2o_socket_error_closed); /* refused, no longer read */
    }
  }
  if (srv->nconns == 0) drv__srv_finalize(srv);
}

/* Engine close: everything goes now, synchronously. */
static void drv__srv_res_close(drv_res *res) {
  drv_server *srv = (drv_server *)res;
  drv__srv_shutdown(srv);
  while (srv->conns) {
    drv_conn *c = srv->conns;
    drv__conn_force_close(c);
    if (srv->conns == c) { /* H2O did not let go: unlink it so we can finish */
      srv->conns = c->next;
      if (c->next) c->next->prev = NULL;
      c->next = c->prev = NULL;
      srv->nconns--;
    }
  }
  drv__srv_finalize(srv);
}

/* ---- Lua: responses --------------------------------------------------------------- */

static drv_sreq *drv__check_res(lua_State *L, const char *fname) {
  drv_sreq **slot = (drv_sreq **)luaL_testudata(L, 1, DRV_RES_MT);
  if (slot == NULL) drv__argerror(L, fname, "self", "response object", 1);
  return *slot;
}

static int drv__check_status(lua_State *L, int idx, const char *fname) {
  lua_Integer s;
  if (!lua_isinteger(L, idx)) {
    if (lua_type(L, idx) == LUA_TNUMBER && lua_tonumber(L, idx) == (lua_Number)(lua_Integer)lua_tonumber(L, idx))
      s = (lua_Integer)lua_tonumber(L, idx);
    else
      return drv__argerror(L, fname, "status", "integer", idx);
  } else {
    s = lua_tointeger(L, idx);
  }
  if (s < 200 || s > 999)
    return luaL_error(L, "%s: bad argument 'status' (%I is not a final HTTP status, 200-999)", fname, s);
  return (int)s;
}

static int drv__tchar(int c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Add one header (name at -2 is checked by the caller, value at -1). */
static void drv__add_header(lua_State *L, h2o_req_t *req, const char *fname, const char *name,
                            size_t nlen, int vidx) {
  size_t vlen, i;
  const char *v;
  const h2o_token_t *tok;
  h2o_iovec_t lname, val;
  int t = lua_type(L, vidx);
  if (t != LUA_TSTRING && t != LUA_TNUMBER) {
    luaL_error(L, "%s: bad header '%s' (string expected, got %s)", fname, name, luaL_typename(L, vidx));
    return;
  }
  v = lua_tolstring(L, vidx, &vlen);
  for (i = 0; i < vlen; i++) {
    if (v[i] == '\r' || v[i] == '\n' || v[i] == '\0') {
      luaL_error(L, "%s: bad header '%s' (value contains CR, LF or NUL)", fname, name);
      return;
    }
  }
  lname = h2o_strdup(&req->pool, name, nlen);
  h2o_strtolower(lname.base, lname.len);
  /* The server owns these: it frames the body and manages the connection. */
  if (h2o_memis(lname.base, lname.len, H2O_STRLIT("content-length")) ||
      h2o_memis(lname.base, lname.len, H2O_STRLIT("transfer-encoding")) ||
      h2o_memis(lname.base, lname.len, H2O_STRLIT("date")))
    return;
  if (h2o_memis(lname.base, lname.len, H2O_STRLIT("connection"))) {
    if (h2o_contains_token(v, vlen, H2O_STRLIT("close"), ',')) req->http1_is_persistent = 0;
    return;
  }
  val = h2o_strdup(&req->pool, v, vlen);
  if ((tok = h2o_lookup_token(lname.base, lname.len)) != NULL)
    h2o_add_header(&req->pool, &req->res.headers, tok, NULL, val.base, val.len);
  else
    h2o_add_header_by_str(&req->pool, &req->res.headers, lname.base, lname.len, 0, NULL, val.base, val.len);
}

/* Validate and add the headers table at idx (nil: none).  Raises before
 * anything reaches the client. */
static void drv__set_headers(lua_State *L, int idx, h2o_req_t *req, const char *fname) {
  if (lua_isnoneornil(L, idx)) return;
  if (!lua_istable(L, idx)) {
    drv__argerror(L, fname, "headers", "table", idx);
    return;
  }
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    size_t nlen, i;
    const char *name;
    if (lua_type(L, -2) != LUA_TSTRING) {
      luaL_error(L, "%s: bad argument 'headers' (names must be strings, got %s)", fname,
                 luaL_typename(L, -2));
      return;
    }
    name = lua_tolstring(L, -2, &nlen);
    for (i = 0; i < nlen; i++)
      if (!drv__tchar((unsigned char)name[i])) break;
    if (nlen == 0 || i < nlen) {
      luaL_error(L, "%s: bad argument 'headers' ('%s' is not a valid header name)", fname, name);
      return;
    }
    if (lua_istable(L, -1)) {
      lua_Integer k, n = (lua_Integer)lua_rawlen(L, -1);
      for (k = 1; k <= n; k++) {
        lua_rawgeti(L, -1, k);
        drv__add_header(L, req, fname, name, nlen, lua_gettop(L));
        lua_pop(L, 1);
      }
    } else {
      drv__add_header(L, req, fname, name, nlen, lua_gettop(L));
    }
    lua_pop(L, 1);
  }
}

static void drv__default_ctype(h2o_req_t *req) {
  if (h2o_find_header(&req->res.headers, H2O_TOKEN_CONTENT_TYPE, -1) == -1)
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL,
                   H2O_STRLIT("text/plain; charset=utf-8"));
}

static int drv__push_closed(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "closed");
  return 2;
}

static const char *drv__check_body(lua_State *L, int idx, size_t *len, const char *fname,
                                   const char *argname) {
  if (lua_isnoneornil(L, idx)) {
    *len = 0;
    return "";
  }
  if (lua_type(L, idx) != LUA_TSTRING) {
    drv__argerror(L, fname, argname, "string", idx);
    return NULL;
  }
  return lua_tolstring(L, idx, len);
}

static char *drv__dup(lua_State *L, const char *s, size_t len) {
  char *p;
  if (len == 0) return NULL;
  p = (char *)malloc(len);
  if (p == NULL) luaL_error(L, "drover.server: out of memory");
  memcpy(p, s, len);
  return p;
}

static int drv__no_body(int status) { return status == 204 || status == 304; }

static void drv__body_disposed(void *p) { drv__body_unref(*(drv_body **)p); }

/* The whole response at once, with a content-length: status, the headers
 * table at hidx (nil: none), the body at bidx (a string, copied; a body
 * object, sent as it is; nil: none).  r is new and its request alive.
 * Raises on a bad header before anything is sent. */
static void drv__respond(lua_State *L, drv_sreq *r, int status, int hidx, int bidx, const char *F) {
  static h2o_generator_t gen = {NULL, NULL};
  size_t len;
  const char *body;
  drv_body *shared = drv__test_body(L, bidx);
  h2o_req_t *req = r->req;
  h2o_iovec_t buf;
  if (shared) {
    body = shared->bytes;
    len = shared->len;
  } else {
    body = drv__check_body(L, bidx, &len, F, "body");
  }
  drv__set_headers(L, hidx, req, F);
  if (len > 0) drv__default_ctype(req);
  req->res.status = status;
  req->res.reason = drv__reason(status);
  buf.base = NULL;
  buf.len = 0;
  if (drv__no_body(status)) {
    req->res.content_length = SIZE_MAX;
  } else {
    req->res.content_length = len;
    if (!r->is_head && len > 0 && shared) {
      /* the pool holds a reference until H2O is done with the bytes */
      drv_body **ref = (drv_body **)h2o_mem_alloc_shared(&req->pool, sizeof *ref, drv__body_disposed);
      *ref = shared;
      shared->refs++;
      buf.base = shared->bytes;
      buf.len = len;
    } else if (!r->is_head && len > 0) {
      buf.base = (char *)h2o_mem_alloc_pool(&req->pool, len);
      memcpy(buf.base, body, len);
      buf.len = len;
    }
  }
  r->state = S_DONE;
  r->answered = 1;
  h2o_start_response(req, &gen);
  h2o_send(req, buf.len ? &buf : NULL, buf.len ? 1 : 0, H2O_SEND_STATE_FINAL);
}

/* res:respond(status [, headers] [, body]) -> true | nil, "closed"
 * The whole response at once, with a content-length.  Does not wait.
 * body: a string (copied) or a body object (sent as it is). */
static int drv__l_res_respond(lua_State *L) {
  const char *F = "res:respond";
  drv_sreq *r = drv__check_res(L, F);
  int status = drv__check_status(L, 2, F);
  if ((lua_type(L, 3) == LUA_TSTRING || drv__test_body(L, 3)) && lua_isnoneornil(L, 4)) {
    /* respond(status, body) */
    lua_pushnil(L);
    lua_insert(L, 3);
  }
  lua_settop(L, 4);
  if (!drv__test_body(L, 4)) {
    size_t len;
    drv__check_body(L, 4, &len, F, "body"); /* a bad body raises whether or not the client is there */
  }
  if (r->req == NULL) return drv__push_closed(L);
  if (r->state != S_NEW) return luaL_error(L, "%s: the response was already started", F);
  drv__respond(L, r, status, 3, 4, F);
  lua_pushboolean(L, 1);
  return 1;
}

/* res:start(status [, headers]) -> true | nil, "closed"
 * Send the status and headers; the body follows with res:write.  HTTP/1.1
 * clients get chunked encoding for a 200.  Waits until the headers are
 * handed to the socket. */
static int drv__l_res_start(lua_State *L) {
  const char *F = "res:start";
  drv_sreq *r = drv__check_res(L, F);
  int status = drv__check_status(L, 2, F);
  h2o_req_t *req;
  if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3)) return drv__argerror(L, F, "headers", "table", 3);
  if (r->req == NULL) return drv__push_closed(L);
  if (r->state != S_NEW) return luaL_error(L, "%s: the response was already started", F);
  drv__wait_init(&r->wait, L); /* may raise: before anything is sent */
  req = r->req;
  drv__set_headers(L, 3, req, F);
  drv__default_ctype(req);
  req->res.status = status;
  req->res.reason = drv__reason(status);
  req->res.content_length = SIZE_MAX;
  r->state = S_STREAM;
  h2o_start_response(req, &r->gen);
  drv__sreq_send(r, NULL, 0, H2O_SEND_STATE_IN_PROGRESS);
  r->waiting = 1;
  r->wait.cancel = drv__sreq_wait_cancel;
  lua_settop(L, 0);
  return drv__await(L, &r->wait);
}

/* res:write(chunk) -> true | nil, "closed"
 * Waits until the chunk is handed to the socket: a slow client slows the
 * writer down instead of filling memory. */
static int drv__l_res_write(lua_State *L) {
  const char *F = "res:write";
  drv_sreq *r = drv__check_res(L, F);
  size_t len;
  const char *s = drv__check_body(L, 2, &len, F, "chunk");
  char *buf;
  if (lua_isnoneornil(L, 2)) return drv__argerror(L, F, "chunk", "string", 2);
  if (r->req == NULL) return drv__push_closed(L);
  if (r->state == S_NEW) return luaL_error(L, "%s: call res:start first", F);
  if (r->state == S_DONE) return luaL_error(L, "%s: the response is finished", F);
  if (r->waiting) return luaL_error(L, "%s: another write on this response is in progress", F);
  if (len == 0 || r->is_head) {
    lua_pushboolean(L, 1);
    return 1;
  }
  drv__wait_init(&r->wait, L);
  buf = drv__dup(L, s, len);
  if (r->inflight) {
    free(r->pend);
    r->pend = buf;
    r->pend_len = len;
    r->pend_what = P_CHUNK;
  } else {
    r->refs++;
    drv__sreq_send(r, buf, len, H2O_SEND_STATE_IN_PROGRESS);
    if (r->req == NULL) { /* closed at once */
      drv__sreq_unref(r);
      return drv__push_closed(L);
    }
    drv__sreq_unref(r);
  }
  r->waiting = 1;
  r->wait.cancel = drv__sreq_wait_cancel;
  lua_settop(L, 0);
  return drv__await(L, &r->wait);
}

/* res:finish([chunk]) -> true | nil, "closed"   End a streamed response. */
static int drv__l_res_finish(lua_State *L) {
  const char *F = "res:finish";
  drv_sreq *r = drv__check_res(L, F);
  size_t len;
  const char *s = drv__check_body(L, 2, &len, F, "chunk");
  char *buf;
  if (r->req == NULL) return drv__push_closed(L);
  if (r->state == S_NEW) return luaL_error(L, "%s: call res:start first", F);
  if (r->state == S_DONE) return luaL_error(L, "%s: the response is finished", F);
  if (r->waiting) return luaL_error(L, "%s: a write on this response is in progress", F);
  if (r->is_head) len = 0;
  buf = drv__dup(L, s, len);
  r->state = S_DONE;
  r->answered = 1;
  if (r->inflight) {
    free(r->pend);
    r->pend = buf;
    r->pend_len = len;
    r->pend_what = P_FINAL;
  } else {
    drv__sreq_send(r, buf, len, H2O_SEND_STATE_FINAL);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* res:abort() -> true | nil, "closed"
 * Drop the response and close the connection (a streamed body ends
 * incomplete, so the client can tell). */
static int drv__l_res_abort(lua_State *L) {
  drv_sreq *r = drv__check_res(L, "res:abort");
  if (r->req == NULL) return drv__push_closed(L);
  r->answered = 1;
  drv__sreq_abort(r, 0);
  lua_pushboolean(L, 1);
  return 1;
}

static int drv__l_res_index(lua_State *L) {
  drv_sreq *r = drv__check_res(L, "res");
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "closed") == 0) {
    lua_pushboolean(L, r->req == NULL);
  } else if (strcmp(k, "started") == 0) {
    lua_pushboolean(L, r->state != S_NEW);
  } else if (strcmp(k, "finished") == 0) {
    lua_pushboolean(L, r->state == S_DONE);
  } else {
    lua_getmetatable(L, 1);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, k);
  }
  return 1;
}

static int drv__l_res_gc(lua_State *L) {
  drv_sreq **slot = (drv_sreq **)lua_touserdata(L, 1);
  drv_sreq *r = *slot;
  if (r == NULL) return 0;
  *slot = NULL;
  r->res = NULL;
  r->task = NULL;
  drv__sreq_unref(r);
  return 0;
}

static int drv__l_res_tostring(lua_State *L) {
  drv_sreq *r = drv__check_res(L, "res");
  static const char *const names[] = {"new", "streaming", "finished"};
  lua_pushfstring(L, "drover.server.response(%s%s)", names[r->state], r->req ? "" : ", closed");
  return 1;
}

/* ---- Lua: dispatch (the body of every handler task) ------------------------------ */

/* Message handler: keep "cancelled" as is; otherwise {err, trace}. */
static int drv__srv_msgh(lua_State *L) {
  const char *msg;
  if (lua_type(L, 1) == LUA_TSTRING && strcmp(lua_tostring(L, 1), "cancelled") == 0) return 1;
  msg = lua_tostring(L, 1);
  if (msg == NULL) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  lua_createtable(L, 2, 0);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 1);
  luaL_traceback(L, L, msg, 1);
  lua_rawseti(L, -2, 2);
  return 1;
}

/* Report a handler failure: on_error(err, trace) in its own task (it may
 * wait), or a line on stderr.  err and trace are at the top. */
static void drv__srv_report(lua_State *L) {
  int top = lua_gettop(L);
  if (lua_isfunction(L, lua_upvalueindex(2))) {
    lua_pushvalue(L, lua_upvalueindex(3));
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_pushvalue(L, top - 1);
    lua_pushvalue(L, top);
    if (lua_pcall(L, 3, 0, 0) != LUA_OK) lua_pop(L, 1);
  } else {
    const char *t = lua_tostring(L, top);
    drv__log(drv__engine(L), "error", "drover.server: handler failed: %s", t ? t : "?");
  }
  lua_settop(L, top);
}

/* What a handler returned, at base..base+2: body | status [, headers] [,
 * body] | status, body | nothing (204).  Sets *status and the indices of
 * headers and body (0: none); returns 0 with a message on top if the
 * values are bad. */
static int drv__answer_form(lua_State *L, int base, const char *who, int *statusp, int *hidxp, int *bidxp) {
  int t1 = lua_type(L, base), status = 200, hidx = 0, bidx = 0;
  if (t1 == LUA_TNIL) {
    status = 204;
  } else if (t1 == LUA_TSTRING || drv__test_body(L, base)) {
    bidx = base;
  } else if (lua_isinteger(L, base)) {
    lua_Integer s = lua_tointeger(L, base);
    if (s < 200 || s > 999) {
      lua_pushfstring(L, "drover.server: %s returned status %I (not a final HTTP status, 200-999)", who, s);
      return 0;
    }
    status = (int)s;
    if ((lua_type(L, base + 1) == LUA_TSTRING || drv__test_body(L, base + 1)) && lua_isnil(L, base + 2)) {
      bidx = base + 1;
    } else {
      hidx = base + 1;
      bidx = base + 2;
      if (!lua_isnil(L, hidx) && !lua_istable(L, hidx)) {
        lua_pushfstring(L, "drover.server: %s returned headers of type %s (table expected)",
                        who, luaL_typename(L, hidx));
        return 0;
      }
    }
  } else {
    lua_pushfstring(L, "drover.server: %s returned a %s (expected status, headers, body)",
                    who, luaL_typename(L, base));
    return 0;
  }
  if (bidx && !lua_isnil(L, bidx) && lua_type(L, bidx) != LUA_TSTRING && !drv__test_body(L, bidx)) {
    lua_pushfstring(L, "drover.server: %s returned a body of type %s (string or body object expected)",
                    who, luaL_typename(L, bidx));
    return 0;
  }
  *statusp = status;
  *hidxp = hidx;
  *bidxp = bidx;
  return 1;
}

/* The handler returned: answer with what it returned (values from base),
 * unless it answered itself.  Returns 0 with a message on top if the
 * values are bad. */
static int drv__srv_answer(lua_State *L, drv_sreq *r, int base) {
  int status, hidx, bidx;
  if (r->state == S_STREAM) {
    /* streamed and returned without res:finish(): finish for it */
    if (r->req && !r->waiting) {
      lua_pushcfunction(L, drv__l_res_finish);
      lua_pushvalue(L, 2);
      lua_call(L, 1, 0);
    }
    return 1;
  }
  if (r->state != S_NEW || r->req == NULL) return 1;
  if (!drv__answer_form(L, base, "handler", &status, &hidx, &bidx)) return 0;
  /* res:respond checks the headers; a bad one is the handler's error */
  lua_pushcfunction(L, drv__l_res_respond);
  lua_pushvalue(L, 2);
  lua_pushinteger(L, status);
  if (hidx) lua_pushvalue(L, hidx); else lua_pushnil(L);
  if (bidx) lua_pushvalue(L, bidx); else lua_pushnil(L);
  return lua_pcall(L, 4, 0, 0) == LUA_OK;
}

static int drv__srv_dispatch_k(lua_State *L, int status, lua_KContext ctx) {
  drv_sreq *r = *(drv_sreq **)lua_touserdata(L, 2);
  (void)ctx;
  if (status == LUA_OK || status == LUA_YIELD) {
    if (drv__srv_answer(L, r, 4)) return 0;
    /* a bad return value: message at the top */
    lua_pushvalue(L, -1);
  } else {
    /* stack: req, res, msgh, error object */
    if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "cancelled") == 0) {
      r->answered = 1;
      drv__sreq_abort(r, 0);
      return 0;
    }
    if (lua_istable(L, -1)) {
      lua_rawgeti(L, -1, 1);
      lua_rawgeti(L, -2, 2);
    } else {
      lua_pushvalue(L, -1);
      lua_pushvalue(L, -1);
    }
  }
  drv__srv_report(L);
  r->answered = 1;
  if (r->req && r->state == S_NEW) {
    r->state = S_DONE;
    h2o_send_error_500(r->req, "Internal Server Error", "internal server error\n", 0);
  } else {
    drv__sreq_abort(r, 0);
  }
  return 0;
}

/* dispatch(req, res): upvalues handler, on_error, spawn. */
static int drv__srv_dispatch(lua_State *L) {
  lua_settop(L, 2);
  lua_pushcfunction(L, drv__srv_msgh);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  return drv__srv_dispatch_k(L, lua_pcallk(L, 2, 3, 3, 0, drv__srv_dispatch_k), 0);
}

/* ---- Lua: body objects ------------------------------------------------------------ */

/* server.body(bytes) -> body object: the bytes copied once, out of Lua. */
static int drv__l_body(lua_State *L) {
  size_t len;
  const char *s;
  drv_body *b, **slot;
  if (lua_type(L, 1) != LUA_TSTRING) return drv__argerror(L, "drover.server.body", "bytes", "string", 1);
  s = lua_tolstring(L, 1, &len);
  slot = (drv_body **)lua_newuserdatauv(L, sizeof *slot, 0);
  *slot = NULL;
  luaL_setmetatable(L, DRV_BODY_MT);
  b = (drv_body *)malloc(sizeof *b + len);
  if (b == NULL) return luaL_error(L, "drover.server.body: out of memory (%I bytes)", (lua_Integer)len);
  b->refs = 1;
  b->len = len;
  memcpy(b->bytes, s, len);
  *slot = b;
  drv__bodies++;
  drv__body_bytes += len;
  return 1;
}

static drv_body *drv__check_body_obj(lua_State *L, const char *fname) {
  drv_body **slot = (drv_body **)luaL_testudata(L, 1, DRV_BODY_MT);
  if (slot == NULL || *slot == NULL) drv__argerror(L, fname, "self", "body object", 1);
  return *slot;
}

/* body:bytes() -> the bytes, as a string */
static int drv__l_body_bytes(lua_State *L) {
  drv_body *b = drv__check_body_obj(L, "body:bytes");
  lua_pushlstring(L, b->bytes, b->len);
  return 1;
}

static int drv__l_body_len(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)drv__check_body_obj(L, "body")->len);
  return 1;
}

static int drv__l_body_tostring(lua_State *L) {
  lua_pushfstring(L, "drover.server.body(%I bytes)", (lua_Integer)drv__check_body_obj(L, "body")->len);
  return 1;
}

/* The Lua object's reference goes; responses still being written keep
 * theirs. */
static int drv__l_body_gc(lua_State *L) {
  drv_body **slot = (drv_body **)lua_touserdata(L, 1);
  if (*slot) drv__body_unref(*slot);
  *slot = NULL;
  return 0;
}

/* server.body_stats() -> { count =, bytes = }: body objects alive in this
 * process (collected by Lua and written out by every response using them
 * is gone). */
static int drv__l_body_stats(lua_State *L) {
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, (lua_Integer)drv__bodies);
  lua_setfield(L, -2, "count");
  lua_pushinteger(L, (lua_Integer)drv__body_bytes);
  lua_setfield(L, -2, "bytes");
  return 1;
}

/* ---- Lua: servers ---------------------------------------------------------------- */

static drv_server *drv__check_server(lua_State *L, const char *fname) {
  drv_server **pp = (drv_server **)luaL_testudata(L, 1, DRV_SERVER_MT);
  if (pp == NULL) drv__argerror(L, fname, "self", "server object", 1);
  return *pp;
}

/* server:close() -> true (false if it was closed already) */
static int drv__l_server_close(lua_State *L) {
  drv_server *srv = drv__check_server(L, "server:close");
  if (srv == NULL || srv->closing) {
    lua_pushboolean(L, 0);
    return 1;
  }
  drv__srv_shutdown(srv);
  lua_pushboolean(L, 1);
  return 1;
}

/* server:stats() -> { connections =, active =, requests =, turned_away = } */
static int drv__l_server_stats(lua_State *L) {
  drv_server *srv = drv__check_server(L, "server:stats");
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, srv ? srv->nconns : 0);
  lua_setfield(L, -2, "connections");
  lua_pushinteger(L, srv ? (lua_Integer)srv->turned_away : 0);
  lua_setfield(L, -2, "turned_away");
  lua_pushinteger(L, srv ? srv->nlive : 0);
  lua_setfield(L, -2, "active");
  lua_pushinteger(L, srv ? (lua_Integer)srv->served : 0);
  lua_setfield(L, -2, "requests");
  return 1;
}

static int drv__l_server_index(lua_State *L) {
  drv_server *srv = drv__check_server(L, "server");
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "closed") == 0) {
    lua_pushboolean(L, srv == NULL || srv->closing);
    return 1;
  }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  if (lua_getfield(L, -1, k) != LUA_TNIL) return 1;
  lua_getiuservalue(L, 1, 1);
  lua_getfield(L, -1, k);
  return 1;
}

static int drv__l_server_gc(lua_State *L) {
  drv_server **pp = (drv_server **)lua_touserdata(L, 1);
  /* The server keeps running (and closes with the engine); only the link
   * back to this object goes. */
  if (*pp) (*pp)->owner = NULL;
  *pp = NULL;
  return 0;
}

static int drv__l_server_tostring(lua_State *L) {
  drv_server *srv = drv__check_server(L, "server");
  lua_getiuservalue(L, 1, 1);
  lua_getfield(L, -1, "url");
  lua_pushfstring(L, "drover.server(%s%s%s)", lua_tostring(L, -1),
                  srv && srv->is_unix ? " via " : "",
                  srv && srv->is_unix ? srv->unix_path : "");
  if (srv == NULL || srv->closing) {
    lua_pushliteral(L, ", closed");
    lua_concat(L, 2);
  }
  return 1;
}

/* A unix socket file left by a server that died is in the way of a new
 * bind; remove it, but only if nothing answers on it. */
static void drv__remove_stale_socket(const char *path) {
  struct stat st;
  struct sockaddr_un sa;
  int fd, r;
  if (stat(path, &st) != 0 || !S_ISSOCK(st.st_mode)) return;
  if (strlen(path) >= sizeof sa.sun_path) return;
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  strcpy(sa.sun_path, path);
  r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  if (r != 0 && errno == ECONNREFUSED) unlink(path);
  close(fd);
}

static int drv__listen_error(lua_State *L, drv_server *srv, const char *where, int err) {
  const char *F = "drover.server.listen";
  if (uv_is_closing(&srv->listener.handle) == 0 && srv->listener.handle.type != UV_UNKNOWN_HANDLE)
    uv_close(&srv->listener.handle, drv__srv_listener_freed);
  else {
    free(srv->unix_path);
    if (srv->ssl_ctx) SSL_CTX_free(srv->ssl_ctx);
    free(srv);
  }
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s: %s", F, where, uv_strerror(err));
  return 2;
}

/* drover.core.server.listen(opts) -> server | nil, message
 *   opts.handler   function(req, res), run as a task for each request
 *   opts.on_error  function(err, trace), run as a task when a handler fails
 *   opts.host      address to bind (default "127.0.0.1")
 *   opts.port      port (default 0: the system picks; see server.port)
 *   opts.unix      path of a unix socket to listen on instead
 *   opts.backlog   listen backlog (default 511)
 *   opts.max_body  largest request body in bytes (default 64 MiB; 413 beyond)
 *   opts.max_connections  connections served at once (default 1024); one
 *                  more is answered 503 and closed
 *   opts.check_head  function(head) called, without waiting, once the head
 *                  of a request with a body is in, before the body is read:
 *                  nil lets it go on; status [, headers] [, body] refuses it
 *   opts.fast      function(req) called, without waiting, before a task is
 *                  made for the request: nil hands it to the handler;
 *                  status [, headers] [, body] answers it (no task at all).
 *                  A pass's requests are handed over together, once it has
 *                  read them all (drv__srv_fast_batch)
 *   opts.keepalive_timeout  seconds an idle connection is kept (default 10)
 *   opts.tls       { cert = PEM file, key = PEM file }: serve HTTPS
 * A certificate or key that cannot be read or used returns nil, message
 * (before anything is bound), like a failed bind. */
static int drv__l_listen(lua_State *L) {
  const char *F = "drover.server.listen";
  drv_engine *E = drv__engine(L);
  const char *host, *unixp, *cert = NULL, *key = NULL;
  SSL_CTX *ssl_ctx = NULL;
  lua_Integer port = 0;
  double backlog, max_body, keepalive, max_conns;
  int has_check, has_fast;
  drv_server *srv, **pp;
  char where[300];
  int r;
  if (!lua_istable(L, 1)) return drv__argerror(L, F, "opts", "table", 1);
  lua_settop(L, 1);
  lua_getfield(L, 1, "handler"); /* 2 */
  if (!lua_isfunction(L, 2))
    return luaL_error(L, "%s: bad option 'handler' (function expected, got %s)", F, luaL_typename(L, 2));
  lua_getfield(L, 1, "on_error"); /* 3 */
  if (!lua_isnil(L, 3) && !lua_isfunction(L, 3))
    return luaL_error(L, "%s: bad option 'on_error' (function expected, got %s)", F, luaL_typename(L, 3));
  host = drv__opt_string(L, 1, F, "host", "127.0.0.1");
  if (host == NULL) host = "127.0.0.1";
  unixp = drv__opt_string(L, 1, F, "unix", NULL);
  lua_getfield(L, 1, "port");
  if (!lua_isnil(L, -1)) {
    if (!lua_isinteger(L, -1))
      return luaL_error(L, "%s: bad option 'port' (integer expected, got %s)", F,
                        lua_type(L, -1) == LUA_TNUMBER ? "float" : luaL_typename(L, -1));
    port = lua_tointeger(L, -1);
    if (port < 0 || port > 65535)
      return luaL_error(L, "%s: bad option 'port' (%I is out of range 0-65535)", F, port);
  }
  lua_pop(L, 1);
  backlog = drv__opt_number(L, 1, F, "backlog", 511);
  if (!(backlog >= 1 && backlog <= 65535)) return luaL_error(L, "%s: bad option 'backlog' (must be 1-65535)", F);
  max_body = drv__opt_number(L, 1, F, "max_body", DRV_DEFAULT_MAX_BODY);
  if (!(max_body >= 0 && max_body < 1e15)) return luaL_error(L, "%s: bad option 'max_body' (must be >= 0)", F);
  max_conns = drv__opt_number(L, 1, F, "max_connections", DRV_DEFAULT_MAX_CONNS);
  if (!(max_conns >= 1 && max_conns <= 1e6))
    return luaL_error(L, "%s: bad option 'max_connections' (must be 1-1000000)", F);
  lua_getfield(L, 1, "check_head");
  if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
    return luaL_error(L, "%s: bad option 'check_head' (function expected, got %s)", F, luaL_typename(L, -1));
  has_check = lua_isfunction(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "fast");
  if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
    return luaL_error(L, "%s: bad option 'fast' (function expected, got %s)", F, luaL_typename(L, -1));
  has_fast = lua_isfunction(L, -1);
  lua_pop(L, 1);
  keepalive = drv__opt_number(L, 1, F, "keepalive_timeout", 10);
  if (!(keepalive > 0 && keepalive < 1e7))
    return luaL_error(L, "%s: bad option 'keepalive_timeout' (must be > 0)", F);
  if (unixp && strlen(unixp) >= sizeof(((struct sockaddr_un *)0)->sun_path))
    return luaL_error(L, "%s: bad option 'unix' (path longer than %d bytes)", F,
                      (int)sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
  lua_getfield(L, 1, "tls");
  if (!lua_isnil(L, -1)) {
    if (!lua_istable(L, -1))
      return luaL_error(L, "%s: bad option 'tls' (table expected, got %s)", F, luaL_typename(L, -1));
    /* the strings stay anchored in opts.tls, itself in opts */
    if (lua_getfield(L, -1, "cert") != LUA_TSTRING)
      return luaL_error(L, "%s: bad option 'tls.cert' (string expected, got %s)", F, luaL_typename(L, -1));
    cert = lua_tostring(L, -1);
    if (lua_getfield(L, -2, "key") != LUA_TSTRING)
      return luaL_error(L, "%s: bad option 'tls.key' (string expected, got %s)", F, luaL_typename(L, -1));
    key = lua_tostring(L, -1);
    lua_pop(L, 2);
  }
  lua_pop(L, 1);
  if (cert) {
    char msg[PATH_MAX * 2 + 200];
    ssl_ctx = drv__tls_ctx(cert, key, msg, sizeof msg);
    if (ssl_ctx == NULL) {
      lua_pushnil(L);
      lua_pushstring(L, msg);
      return 2;
    }
  }

  {
    /* A client that disconnects while we write must give EPIPE, not a
     * SIGPIPE that kills the process. */
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  }

  srv = (drv_server *)calloc(1, sizeof *srv);
  if (srv == NULL) {
    if (ssl_ctx) SSL_CTX_free(ssl_ctx);
    return luaL_error(L, "%s: out of memory", F);
  }
  srv->ssl_ctx = ssl_ctx;
  srv->E = E;
  srv->env_ref = LUA_NOREF;
  srv->listener.handle.type = UV_UNKNOWN_HANDLE;

  /* The listener first: if it cannot bind, nothing else was set up. */
  if (unixp) {
    srv->is_unix = 1;
    srv->unix_path = strdup(unixp);
    snprintf(where, sizeof where, "unix:%s", unixp);
    if (srv->unix_path == NULL) return drv__listen_error(L, srv, where, UV_ENOMEM);
    uv_pipe_init(E->loop, &srv->listener.pipe, 0);
    srv->listener.handle.data = srv;
    drv__remove_stale_socket(unixp);
    if ((r = uv_pipe_bind(&srv->listener.pipe, unixp)) != 0) return drv__listen_error(L, srv, where, r);
  } else {
    struct sockaddr_storage ss;
    int is6 = strchr(host, ':') != NULL;
    if (is6) snprintf(where, sizeof where, "[%s]:%d", host, (int)port);
    else snprintf(where, sizeof where, "%s:%d", host, (int)port);
    if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
    r = is6 ? uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)&ss)
            : uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&ss);
    if (r != 0) {
      if (srv->ssl_ctx) SSL_CTX_free(srv->ssl_ctx);
      free(srv);
      return luaL_error(L, "%s: bad option 'host' ('%s' is not a numeric IPv4 or IPv6 address)", F, host);
    }
    uv_tcp_init(E->loop, &srv->listener.tcp);
    srv->listener.handle.data = srv;
    if ((r = uv_tcp_bind(&srv->listener.tcp, (struct sockaddr *)&ss, 0)) != 0)
      return drv__listen_error(L, srv, where, r);
  }
  if ((r = uv_listen(&srv->listener.stream, (int)backlog, drv__srv_on_accept)) != 0)
    return drv__listen_error(L, srv, where, r);
  if (!srv->is_unix) {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if ((r = uv_tcp_getsockname(&srv->listener.tcp, (struct sockaddr *)&ss, &len)) != 0)
      return drv__listen_error(L, srv, where, r);
    port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
  }

  /* H2O: one host, one path, our handler for everything. */
  {
    h2o_hostconf_t *hostconf;
    h2o_pathconf_t *pathconf;
    drv_handler *h;
    h2o_config_init(&srv->config);
    srv->config.server_name = h2o_iovec_init(NULL, 0); /* no Server: header */
    srv->config.http1.upgrade_to_http2 = 0;
    srv->config.max_request_entity_size = (size_t)max_body;
    srv->config.http1.req_timeout = (uint64_t)(keepalive * 1000);
    hostconf = h2o_config_register_host(&srv->config, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    pathconf = h2o_config_register_path(hostconf, "/", 0);
    h = (drv_handler *)h2o_create_handler(pathconf, sizeof *h);
    h->super.on_req = drv__srv_on_req;
    h->srv = srv;
    h2o_context_init(&srv->ctx, E->loop, &srv->config);
    srv->accept_ctx.ctx = &srv->ctx;
    srv->accept_ctx.hosts = srv->config.hosts;
    srv->accept_ctx.ssl_ctx = srv->ssl_ctx;
  }
  uv_timer_init(E->loop, &srv->watch);
  srv->watch.data = srv;
  srv->max_conns = (int)max_conns;
  srv->has_check = has_check;
  srv->has_fast = has_fast;
  uv_prepare_init(E->loop, &srv->wrap);
  srv->wrap.data = srv;
  uv_check_init(E->loop, &srv->fast_check);
  srv->fast_check.data = srv;
  uv_unref((uv_handle_t *)&srv->fast_check);
  uv_idle_init(E->loop, &srv->fast_idle);
  srv->fast_idle.data = srv;
  uv_unref((uv_handle_t *)&srv->fast_idle);
  if (has_check) {
    uv_prepare_start(&srv->wrap, drv__srv_wrap_cb);
    uv_unref((uv_handle_t *)&srv->wrap);
  }

  /* env: what each request needs from Lua */
  lua_createtable(L, 0, 3);
  lua_pushvalue(L, lua_upvalueindex(1)); /* drover.core.spawn */
  lua_setfield(L, -2, "spawn");
  lua_pushvalue(L, 2);                   /* handler */
  lua_pushvalue(L, 3);                   /* on_error */
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushcclosure(L, drv__srv_dispatch, 3);
  lua_setfield(L, -2, "dispatch");
  lua_getfield(L, 1, "check_head");
  lua_setfield(L, -2, "check_head");
  lua_getfield(L, 1, "fast");
  lua_setfield(L, -2, "fast");
  luaL_getmetatable(L, DRV_RES_MT);
  lua_setfield(L, -2, "res_mt");
  srv->env_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  drv__res_link(E, &srv->res, drv__srv_res_close);

  /* the Lua object: slot + a table of static fields */
  pp = (drv_server **)lua_newuserdatauv(L, sizeof *pp, 1);
  *pp = srv;
  srv->owner = pp;
  luaL_setmetatable(L, DRV_SERVER_MT);
  lua_createtable(L, 0, 5);
  lua_pushboolean(L, srv->ssl_ctx != NULL);
  lua_setfield(L, -2, "tls");
  if (srv->is_unix) {
    lua_pushstring(L, unixp);
    lua_setfield(L, -2, "unix");
    lua_pushstring(L, srv->ssl_ctx ? "https://localhost" : "http://localhost");
    lua_setfield(L, -2, "url");
  } else {
    const char *scheme = srv->ssl_ctx ? "https" : "http";
    const char *uhost = strcmp(host, "0.0.0.0") == 0 ? "127.0.0.1" : strcmp(host, "::") == 0 ? "::1" : host;
    lua_pushstring(L, host);
    lua_setfield(L, -2, "host");
    lua_pushinteger(L, port);
    lua_setfield(L, -2, "port");
    if (strchr(uhost, ':')) lua_pushfstring(L, "%s://[%s]:%d", scheme, uhost, (int)port);
    else lua_pushfstring(L, "%s://%s:%d", scheme, uhost, (int)port);
    lua_setfield(L, -2, "url");
  }
  lua_setiuservalue(L, -2, 1);
  return 1;
}

int drv__open_server(lua_State *L) {
  static const luaL_Reg res_methods[] = {{"respond", drv__l_res_respond}, {"start", drv__l_res_start},
                                         {"write", drv__l_res_write},     {"finish", drv__l_res_finish},
                                         {"abort", drv__l_res_abort},     {NULL, NULL}};
  static const luaL_Reg srv_methods[] = {{"close", drv__l_server_close}, {"stats", drv__l_server_stats},
                                         {NULL, NULL}};
  if (luaL_newmetatable(L, DRV_RES_MT)) {
    lua_pushcfunction(L, drv__l_res_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, drv__l_res_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, drv__l_res_tostring);
    lua_setfield(L, -2, "__tostring");
    luaL_newlib(L, res_methods);
    lua_setfield(L, -2, "methods");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, DRV_SERVER_MT)) {
    lua_pushcfunction(L, drv__l_server_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, drv__l_server_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, drv__l_server_tostring);
    lua_setfield(L, -2, "__tostring");
    luaL_newlib(L, srv_methods);
    lua_setfield(L, -2, "methods");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, DRV_BODY_MT)) {
    static const luaL_Reg body_methods[] = {{"bytes", drv__l_body_bytes}, {NULL, NULL}};
    lua_pushcfunction(L, drv__l_body_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, drv__l_body_len);
    lua_setfield(L, -2, "__len");
    lua_pushcfunction(L, drv__l_body_tostring);
    lua_setfield(L, -2, "__tostring");
    luaL_newlib(L, body_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, drv__l_body);
  lua_setfield(L, -2, "body");
  lua_pushcfunction(L, drv__l_body_stats);
  lua_setfield(L, -2, "body_stats");
  /* engine.c opens submodules with drover.core just below our table:
   * listen needs its spawn to start handler tasks. */
  lua_getfield(L, -2, "spawn");
  if (!lua_isfunction(L, -1)) return luaL_error(L, "drover.server: drover.core.spawn missing");
  lua_pushcclosure(L, drv__l_listen, 1);
  lua_setfield(L, -2, "listen");
  return 0;
}

/* Entry point when this file is built as the drover binary's plugin
 * (engine/cli/server_loader.c explains why). */
int drv__server_plugin_open(lua_State *L);
int drv__server_plugin_open(lua_State *L) { return drv__open_server(L); }
