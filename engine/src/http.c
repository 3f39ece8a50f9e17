/*
 * http.c -- drover.core.http: HTTP requests on libcurl's multi interface,
 * driven by the engine's libuv loop.
 *
 * One multi handle per engine (E->http, created on the first request) owns
 * the connection cache and the DNS cache, so every request from every task
 * shares them: a second request to the same host reuses the idle keep-alive
 * connection of the first.  curl tells us which sockets to watch
 * (CURLMOPT_SOCKETFUNCTION -> one uv_poll_t per socket) and when to wake it
 * (CURLMOPT_TIMERFUNCTION -> one uv_timer_t); libuv calls back, we call
 * curl_multi_socket_action, and finished transfers are collected with
 * curl_multi_info_read.  This is curl's docs/examples/multi-uv.c, plus
 * the wait contract of drover_int.h.
 *
 * A request is a drv_req (malloc'd, owned by this file) referenced from a
 * small full userdata (the "box") that sits on the waiting function's stack.
 * The box is what ties the C side to Lua's lifetime: if the waiting task is
 * cancelled, or the whole state is closed, the box is collected and its
 * __gc detaches and frees the request.  The result table is built in the
 * wait's continuation (drv__req_k), in the task's own context, so curl's
 * callbacks never allocate Lua memory where an error could not be caught --
 * with one exception, on_chunk, which is called inside lua_pcall on a
 * thread of its own.
 *
 * The rule curl imposes, and this file keeps: no curl_multi_* call (add,
 * remove, socket_action) from inside a curl callback.  The scheduler never
 * resumes tasks from our callbacks (drv__wake only queues them), so the only
 * Lua code that can run inside curl is on_chunk; while it runs, H->in_curl
 * is set, new requests are refused and removals (a cancel, a collected box)
 * are deferred until curl_multi_socket_action has returned.
 *
 * Request headers are never logged or put into error messages: they may
 * carry tokens.  URLs in error messages have their user:password removed.
 */
#include "drover_int.h"

#include "lazylib.h"
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DRV_REQ_MT "drover.http.request"
#define DRV_EASY_POOL 64 /* idle easy handles kept for reuse */

typedef struct drv_http drv_http;
typedef struct drv_req drv_req;
typedef struct drv_sock drv_sock;

typedef struct {
  drv_req *r; /* NULL once the request is freed */
} drv_req_box;

enum { R_NEW, R_ACTIVE, R_DONE }; /* R_ACTIVE: the easy handle is in the multi */

struct drv_req {
  drv_wait wait;              /* first member: the cancel hook casts back */
  drv_http *H;
  drv_req *prev, *next;       /* H->reqs: every request not yet freed */
  drv_req_box *box;           /* NULL once the box was collected */
  CURL *easy;
  struct curl_slist *headers;
  int state;
  int woken;                  /* drv__wake was called (exactly once) */
  int cancelled;              /* the task was cancelled or the box collected */
  int orphan;                 /* the box is gone: free on detach, never wake */
  int deferred;               /* removal from the multi waits for curl to return */
  CURLcode code;
  char *url;                  /* for messages, userinfo removed */
  char method[16];
  lua_State *cbL;             /* on_chunk: a thread with the function at index 1 */
  char *cb_err;               /* on_chunk's error message */
  int oom;                    /* a callback ran out of memory */
  char *body;                 /* accumulated response body */
  size_t body_len, body_cap;
  char *hdrs;                 /* response headers: "name\0value\0"... */
  size_t hdrs_len, hdrs_cap;
  char errbuf[CURL_ERROR_SIZE];
  int socket_errno;           /* why the last socket could not be opened, or 0 */
};

struct drv_sock {
  uv_poll_t poll;
  curl_socket_t fd;
  drv_http *H;
  drv_sock *prev, *next;
};

struct drv_http {
  drv_engine *E;
  CURLM *multi;
  uv_timer_t timer;
  drv_req *reqs;
  drv_sock *socks;
  CURL *pool[DRV_EASY_POOL];
  int npool;
  int in_curl;      /* > 0 while curl_multi_socket_action is on the C stack */
  int ndeferred;
  int closing;
};

/* ---- small helpers --------------------------------------------------------- */

/* Copy url without "user:password@" so it can go into messages. */
static char *drv__redact_url(const char *url) {
  const char *scheme = strstr(url, "://"), *at, *end;
  size_t n = strlen(url);
  char *out = (char *)malloc(n + 4);
  if (out == NULL) return NULL;
  if (scheme) {
    const char *host = scheme + 3;
    end = host + strcspn(host, "/?#");
    at = (const char *)memchr(host, '@', (size_t)(end - host));
    if (at) {
      const char *last = at;
      while ((at = (const char *)memchr(last + 1, '@', (size_t)(end - last - 1))) != NULL) last = at;
      snprintf(out, n + 4, "%.*s***%s", (int)(host - url), url, last);
      return out;
    }
  }
  memcpy(out, url, n + 1);
  return out;
}

/* ---- the multi handle and libuv glue --------------------------------------- */

static void drv__check_multi(drv_http *H);
static void drv__run_deferred(drv_http *H);

static void drv__socket_action(drv_http *H, curl_socket_t fd, int flags) {
  int running = 0;
  H->in_curl++;
  curl_multi_socket_action(H->multi, fd, flags, &running);
  H->in_curl--;
  drv__check_multi(H);
  if (H->ndeferred > 0) drv__run_deferred(H);
}

static void drv__poll_cb(uv_poll_t *p, int status, int events) {
  drv_sock *s = (drv_sock *)p->data;
  int flags = 0;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  drv__socket_action(s->H, s->fd, flags);
}

static void drv__timer_cb(uv_timer_t *t) {
  drv__socket_action((drv_http *)t->data, CURL_SOCKET_TIMEOUT, 0);
}

static void drv__sock_closed(uv_handle_t *h) { free(h->data); }

static void drv__sock_close(drv_http *H, drv_sock *s) {
  if (s->prev) s->prev->next = s->next; else H->socks = s->next;
  if (s->next) s->next->prev = s->prev;
  uv_close((uv_handle_t *)&s->poll, drv__sock_closed);
}

/* CURLMOPT_SOCKETFUNCTION.  curl_multi_assign is the one multi call curl
 * allows here. */
static int drv__curl_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp,
                               void *socketp) {
  drv_http *H = (drv_http *)userp;
  drv_sock *s = (drv_sock *)socketp;
  int events = 0;
  (void)easy;
  if (H->closing) return 0; /* drv__http_free closes every poll handle itself */
  if (what == CURL_POLL_REMOVE) {
    if (s) {
      curl_multi_assign(H->multi, fd, NULL);
      drv__sock_close(H, s);
    }
    return 0;
  }
  if (s == NULL) {
    s = (drv_sock *)calloc(1, sizeof *s);
    if (s == NULL) return -1;
    if (uv_poll_init_socket(H->E->loop, &s->poll, fd) != 0) {
      free(s);
      return -1;
    }
    s->poll.data = s;
    s->fd = fd;
    s->H = H;
    s->next = H->socks;
    if (H->socks) H->socks->prev = s;
    H->socks = s;
    curl_multi_assign(H->multi, fd, s);
  }
  if (what & CURL_POLL_IN) events |= UV_READABLE;
  if (what & CURL_POLL_OUT) events |= UV_WRITABLE;
  uv_poll_start(&s->poll, events, drv__poll_cb);
  return 0;
}

/* CURLMOPT_TIMERFUNCTION.  A 0 ms timeout still goes through the timer:
 * calling curl_multi_socket_action from here is not allowed. */
static int drv__curl_timer_cb(CURLM *multi, long timeout_ms, void *userp) {
  drv_http *H = (drv_http *)userp;
  (void)multi;
  if (H->closing) return 0;
  if (timeout_ms < 0) uv_timer_stop(&H->timer);
  else uv_timer_start(&H->timer, drv__timer_cb, (uint64_t)timeout_ms, 0);
  return 0;
}

static void drv__http_free(drv_engine *E);

static drv_http *drv__http_state(lua_State *L, drv_engine *E) {
  drv_http *H = (drv_http *)E->http;
  if (H) return H;
  if (E->closing) {
    luaL_error(L, "%s: the engine is closing", "drover.http.request");
    return NULL;
  }
  {
    const char *lerr = drv__curl_load();
    if (lerr) {
      luaL_error(L, "drover.http.request: %s", lerr);
      return NULL;
    }
  }
  /* Reference-counted and thread-safe in the curl we build against; paired
   * with curl_global_cleanup in drv__http_free. */
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    luaL_error(L, "drover.http.request: cannot initialise libcurl");
    return NULL;
  }
  H = (drv_http *)calloc(1, sizeof *H);
  if (H == NULL || (H->multi = curl_multi_init()) == NULL) {
    free(H);
    curl_global_cleanup();
    luaL_error(L, "drover.http.request: cannot create a curl multi handle");
    return NULL;
  }
  H->E = E;
  curl_multi_setopt(H->multi, CURLMOPT_SOCKETFUNCTION, drv__curl_socket_cb);
  curl_multi_setopt(H->multi, CURLMOPT_SOCKETDATA, H);
  curl_multi_setopt(H->multi, CURLMOPT_TIMERFUNCTION, drv__curl_timer_cb);
  curl_multi_setopt(H->multi, CURLMOPT_TIMERDATA, H);
  uv_timer_init(E->loop, &H->timer);
  H->timer.data = H;
  E->http = H;
  E->http_free = drv__http_free;
  return H;
}

/* ---- request lifetime ------------------------------------------------------ */

static void drv__req_free(drv_req *r) {
  drv_http *H = r->H;
  if (r->prev) r->prev->next = r->next; else if (H) H->reqs = r->next;
  if (r->next) r->next->prev = r->prev;
  if (r->easy) {
    if (H && !H->closing && H->npool < DRV_EASY_POOL) {
      curl_easy_reset(r->easy);
      H->pool[H->npool++] = r->easy;
    } else {
      curl_easy_cleanup(r->easy);
    }
  }
  curl_slist_free_all(r->headers);
  if (r->box) r->box->r = NULL;
  free(r->url);
  free(r->cb_err);
  free(r->body);
  free(r->hdrs);
  free(r);
}

/* Take the easy handle out of the multi.  Only outside curl callbacks. */
static void drv__req_detach(drv_req *r) {
  drv_http *H = r->H;
  if (r->deferred) {
    r->deferred = 0;
    H->ndeferred--;
  }
  if (r->state == R_ACTIVE) {
    curl_multi_remove_handle(H->multi, r->easy);
    r->state = R_DONE;
  }
}

/* Detach now, or after curl returns if we are inside one of its callbacks. */
static void drv__req_stop(drv_req *r) {
  drv_http *H = r->H;
  if (r->state != R_ACTIVE) return;
  if (H->in_curl > 0) {
    if (!r->deferred) {
      r->deferred = 1;
      H->ndeferred++;
    }
    return;
  }
  drv__req_detach(r);
}

static void drv__run_deferred(drv_http *H) {
  drv_req *r = H->reqs, *next;
  while (r && H->ndeferred > 0) {
    next = r->next;
    if (r->deferred) {
      drv__req_detach(r);
      if (r->orphan) drv__req_free(r);
    }
    r = next;
  }
}

static void drv__req_wake(drv_req *r) {
  if (r->woken || r->orphan) return;
  r->woken = 1;
  drv__wake(&r->wait, 0);
  /* A wait outside any task runs uv_run(UV_RUN_ONCE) until it is woken.
   * When the wake comes from our timer (curl often finishes a transfer in
   * its timeout handling), that is the timers phase at the top of the
   * iteration, and the poll phase that follows would block -- with no timer
   * left and the idle keep-alive socket not watched, forever.  uv_stop makes
   * that poll non-blocking and is reset when uv_run returns; a task's wake
   * needs nothing (the run queue's idle handle keeps the poll from blocking). */
  if (r->wait.task == NULL) uv_stop(r->H->E->loop);
}

static void drv__check_multi(drv_http *H) {
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(H->multi, &left)) != NULL) {
    drv_req *r = NULL;
    CURLcode code;
    if (m->msg != CURLMSG_DONE) continue;
    code = m->data.result; /* m is invalid after remove_handle */
    curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
    if (r == NULL) continue;
    if (!r->cancelled) r->code = code;
    drv__req_detach(r);
    if (r->orphan) drv__req_free(r);
    else drv__req_wake(r);
  }
}

/* The waiting task was cancelled: abort the transfer and wake it (the
 * scheduler then raises "cancelled" in it; the box frees the request). */
static void drv__req_cancel(drv_wait *w) {
  drv_req *r = (drv_req *)w;
  r->cancelled = 1;
  r->code = CURLE_ABORTED_BY_CALLBACK;
  drv__req_stop(r);
  drv__req_wake(r);
}

static int drv__box_gc(lua_State *L) {
  drv_req_box *box = (drv_req_box *)luaL_checkudata(L, 1, DRV_REQ_MT);
  drv_req *r = box->r;
  if (r == NULL) return 0;
  box->r = NULL;
  r->box = NULL;
  r->cbL = NULL; /* anchored by the box: gone with it */
  if (r->state != R_ACTIVE) {
    drv__req_free(r);
    return 0;
  }
  r->orphan = r->cancelled = 1;
  drv__req_stop(r);
  if (r->state != R_ACTIVE && !r->deferred) drv__req_free(r);
  return 0;
}

/* E->http_free: the engine is being closed.  Free every request and easy
 * handle, close our libuv handles (their close callbacks free them while
 * the engine drains the loop) and the multi handle. */
static void drv__http_timer_closed(uv_handle_t *h) { free(h->data); }

static void drv__http_free(drv_engine *E) {
  drv_http *H = (drv_http *)E->http;
  if (H == NULL) return;
  if (H->in_curl > 0) {
    /* lua_close from inside on_chunk (os.exit(n, true)): curl refuses to be
     * cleaned up from its own callback.  The process is on its way out;
     * leave everything as it is (boxes only defer from now on). */
    return;
  }
  E->http = NULL;
  E->http_free = NULL;
  H->closing = 1;
  while (H->reqs) {
    drv_req *r = H->reqs;
    if (r->state == R_ACTIVE) curl_multi_remove_handle(H->multi, r->easy);
    r->state = R_DONE;
    drv__req_free(r);
  }
  while (H->npool > 0) curl_easy_cleanup(H->pool[--H->npool]);
  while (H->socks) drv__sock_close(H, H->socks);
  curl_multi_cleanup(H->multi);
  H->multi = NULL;
  curl_global_cleanup();
  uv_timer_stop(&H->timer);
  uv_close((uv_handle_t *)&H->timer, drv__http_timer_closed);
}

/* ---- curl callbacks (no Lua allocation outside on_chunk's pcall) ---------- */

/* Status line: a new response starts (after a 100 Continue, say), so forget
 * the headers seen so far.  Header line: store "name\0value\0" with the name
 * lower-cased.  A continuation line (obs-fold) extends the last value. */
static size_t drv__curl_header_cb(char *p, size_t size, size_t n, void *ud) {
  drv_req *r = (drv_req *)ud;
  size_t len = size * n, end = len, i, colon;
  while (end > 0 && (p[end - 1] == '\r' || p[end - 1] == '\n')) end--;
  if (end >= 5 && memcmp(p, "HTTP/", 5) == 0) {
    r->hdrs_len = 0;
    return len;
  }
  if (end == 0) return len;
  if ((p[0] == ' ' || p[0] == '\t') && r->hdrs_len > 0) {
    if (drv__grow((void **)&r->hdrs, &r->hdrs_cap, r->hdrs_len + end + 2, 1, 1024) != 0) {
      r->oom = 1;
      return 0;
    }
    r->hdrs[r->hdrs_len - 1] = ' ';
    for (i = 0; i < end && (p[i] == ' ' || p[i] == '\t'); i++) {}
    memcpy(r->hdrs + r->hdrs_len, p + i, end - i);
    r->hdrs_len += end - i;
    r->hdrs[r->hdrs_len++] = '\0';
    return len;
  }
  for (colon = 0; colon < end && p[colon] != ':'; colon++) {}
  if (colon == end || colon == 0) return len;
  i = colon + 1;
  while (i < end && (p[i] == ' ' || p[i] == '\t')) i++;
  while (end > i && (p[end - 1] == ' ' || p[end - 1] == '\t')) end--;
  if (drv__grow((void **)&r->hdrs, &r->hdrs_cap, r->hdrs_len + colon + (end - i) + 2, 1, 1024) != 0) {
    r->oom = 1;
    return 0;
  }
  {
    size_t k;
    for (k = 0; k < colon; k++) r->hdrs[r->hdrs_len + k] = (char)tolower((unsigned char)p[k]);
  }
  r->hdrs_len += colon;
  r->hdrs[r->hdrs_len++] = '\0';
  memcpy(r->hdrs + r->hdrs_len, p + i, end - i);
  r->hdrs_len += end - i;
  r->hdrs[r->hdrs_len++] = '\0';
  return len;
}

/* Runs on r->cbL under lua_pcall: fn(data). */
static int drv__chunk_call(lua_State *L) {
  const char *p = (const char *)lua_touserdata(L, 2);
  size_t n = (size_t)lua_tointeger(L, 3);
  lua_settop(L, 1);
  lua_pushvalue(L, 1);
  lua_pushlstring(L, p, n);
  lua_call(L, 1, 0);
  return 0;
}

/* curl opens its sockets through this only to keep the errno of a failed
 * socket(): curl reports that as "Couldn't connect to server", which hides
 * the real cause (EMFILE when the process is out of descriptors). */
static curl_socket_t drv__curl_open_socket(void *ud, curlsocktype purpose,
                                           struct curl_sockaddr *a) {
  drv_req *r = (drv_req *)ud;
  curl_socket_t fd = socket(a->family, a->socktype, a->protocol);
  (void)purpose;
  r->socket_errno = fd == CURL_SOCKET_BAD ? errno : 0;
  return fd;
}

static size_t drv__curl_write_cb(char *p, size_t size, size_t n, void *ud) {
  drv_req *r = (drv_req *)ud;
  size_t len = size * n;
  if (r->cancelled) return 0; /* aborts the transfer */
  if (r->cbL) {
    lua_State *C = r->cbL;
    if (!lua_checkstack(C, 4)) {
      r->oom = 1;
      return 0;
    }
    lua_settop(C, 1);
    lua_pushcfunction(C, drv__chunk_call);
    lua_pushvalue(C, 1);
    lua_pushlightuserdata(C, p);
    lua_pushinteger(C, (lua_Integer)len);
    if (lua_pcall(C, 3, 0, 0) != LUA_OK) {
      const char *msg = lua_tostring(C, -1);
      char tmp[64];
      if (msg == NULL) {
        snprintf(tmp, sizeof tmp, "(error object is a %s value)", luaL_typename(C, -1));
        msg = tmp;
      }
      free(r->cb_err);
      r->cb_err = strdup(msg);
      if (r->cb_err == NULL) r->oom = 1;
      lua_settop(C, 1);
      return 0;
    }
    lua_settop(C, 1);
    return r->cancelled ? 0 : len;
  }
  if (drv__grow((void **)&r->body, &r->body_cap, r->body_len + len + 1, 1, 1024) != 0) {
    r->oom = 1;
    return 0;
  }
  memcpy(r->body + r->body_len, p, len);
  r->body_len += len;
  return len;
}

/* ---- drover.core.http.request --------------------------------------------- */

static const char *const FN = "drover.http.request";

static int drv__is_tchar(int c) {
  return isalnum(c) || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Check the headers table at idx and build the curl list; *has_ctype and
 * *has_expect report whether the caller set those two. */
static void drv__build_headers(lua_State *L, int idx, drv_req *r, int *has_ctype,
                               int *has_expect) {
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    const char *name, *value;
    size_t nl, vl, i;
    struct curl_slist *l;
    char *line;
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_error(L, "%s: bad option 'headers' (keys must be header names, got %s)", FN,
                 luaL_typename(L, -2));
    name = lua_tolstring(L, -2, &nl);
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
      luaL_error(L, "%s: bad header '%s' (string expected, got %s)", FN, name,
                 luaL_typename(L, -1));
    value = lua_tolstring(L, -1, &vl); /* converts a number value in place: fine */
    if (nl == 0) luaL_error(L, "%s: bad header name '' (empty)", FN);
    for (i = 0; i < nl; i++)
      if (!drv__is_tchar((unsigned char)name[i]))
        luaL_error(L, "%s: bad header name '%s' (not a valid HTTP token)", FN, name);
    for (i = 0; i < vl; i++)
      if (value[i] == '\r' || value[i] == '\n' || value[i] == '\0')
        luaL_error(L, "%s: bad header '%s' (value must not contain CR, LF or NUL)", FN, name);
    if (strcasecmp(name, "content-type") == 0) *has_ctype = 1;
    if (strcasecmp(name, "expect") == 0) *has_expect = 1;
    /* "Name;" is curl's way to send a header with an empty value.  The
     * line is built in a Lua buffer so that an error cannot leak it. */
    {
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      luaL_addlstring(&b, name, nl);
      if (vl == 0) {
        luaL_addchar(&b, ';');
      } else {
        luaL_addstring(&b, ": ");
        luaL_addlstring(&b, value, vl);
      }
      luaL_pushresult(&b);
      line = (char *)lua_tostring(L, -1);
    }
    l = curl_slist_append(r->headers, line); /* copies */
    if (l == NULL) luaL_error(L, "%s: out of memory", FN);
    r->headers = l;
    lua_pop(L, 2);
  }
}

static int drv__req_k(lua_State *L, int status, lua_KContext ctx);

/*
 * core.http.request(opts [, json_body]) -> response | nil, message
 *
 * opts: url (required), method, headers, body, timeout (seconds),
 * unix_socket, on_chunk, insecure, ca_file.  json_body (internal, from http.lua) is
 * an already-encoded body that also defaults content-type to JSON.
 */
static int drv__l_request(lua_State *L) {
  drv_engine *E;
  drv_http *H;
  drv_req *r;
  drv_req_box *box;
  drv_wait w;
  const char *url, *method, *unix_socket, *ca_file, *body = NULL;
  size_t body_len = 0;
  double timeout;
  int insecure, has_ctype = 0, has_expect = 0, is_json = 0, hdr_idx = 0, cb_idx = 0;
  CURL *e;

  if (!lua_istable(L, 1)) return drv__argerror(L, FN, "opts", "table", 1);
  lua_settop(L, 2);
  lua_getfield(L, 1, "url");
  if (lua_type(L, -1) != LUA_TSTRING)
    return luaL_error(L, "%s: bad option 'url' (string expected, got %s)", FN,
                      luaL_typename(L, -1));
  {
    size_t ul;
    url = lua_tolstring(L, -1, &ul); /* anchored by opts */
    if (strlen(url) != ul) return luaL_error(L, "%s: bad option 'url' (contains a NUL byte)", FN);
  }
  lua_pop(L, 1);
  method = drv__opt_string(L, 1, FN, "method", NULL);
  unix_socket = drv__opt_string(L, 1, FN, "unix_socket", NULL);
  ca_file = drv__opt_string(L, 1, FN, "ca_file", NULL);
  timeout = drv__opt_number(L, 1, FN, "timeout", 0);
  if (!(timeout >= 0) || timeout > 1e9)
    return luaL_error(L, "%s: bad option 'timeout' (seconds, from 0 = none to 1e9)", FN);
  insecure = drv__opt_bool(L, 1, FN, "insecure", 0);
  if (lua_type(L, 2) == LUA_TSTRING) {
    body = lua_tolstring(L, 2, &body_len);
    is_json = 1;
  } else {
    body = drv__opt_string(L, 1, FN, "body", NULL);
    if (body) {
      lua_getfield(L, 1, "body");
      lua_tolstring(L, -1, &body_len);
      lua_pop(L, 1);
    }
  }
  lua_getfield(L, 1, "headers");
  if (!lua_isnil(L, -1) && !lua_istable(L, -1))
    return luaL_error(L, "%s: bad option 'headers' (table expected, got %s)", FN,
                      luaL_typename(L, -1));
  if (lua_istable(L, -1)) hdr_idx = lua_gettop(L); else lua_pop(L, 1);
  lua_getfield(L, 1, "on_chunk");
  if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
    return luaL_error(L, "%s: bad option 'on_chunk' (function expected, got %s)", FN,
                      luaL_typename(L, -1));
  if (lua_isfunction(L, -1)) cb_idx = lua_gettop(L); else lua_pop(L, 1);

  if (method) {
    size_t i, ml = strlen(method);
    int ok = ml > 0 && ml < sizeof r->method;
    for (i = 0; ok && i < ml; i++) ok = drv__is_tchar((unsigned char)method[i]);
    if (!ok) return luaL_error(L, "%s: bad option 'method' ('%s' is not an HTTP method)", FN, method);
  }

  E = drv__engine(L);
  if (E->http && ((drv_http *)E->http)->in_curl > 0)
    return luaL_error(L, "%s: cannot start a request from inside on_chunk", FN);
  drv__wait_init(&w, L); /* may raise: before anything is allocated */
  H = drv__http_state(L, E);

  /* From here on the box owns everything: any error frees it through __gc. */
  box = (drv_req_box *)lua_newuserdatauv(L, sizeof *box, 1);
  box->r = NULL;
  luaL_setmetatable(L, DRV_REQ_MT);
  r = (drv_req *)calloc(1, sizeof *r);
  if (r == NULL) return luaL_error(L, "%s: out of memory", FN);
  r->H = H;
  r->box = box;
  box->r = r;
  r->next = H->reqs;
  if (H->reqs) H->reqs->prev = r;
  H->reqs = r;
  r->url = drv__redact_url(url);
  if (r->url == NULL) return luaL_error(L, "%s: out of memory", FN);
  {
    size_t i;
    const char *m = method ? method : (body ? "POST" : "GET");
    for (i = 0; m[i]; i++) r->method[i] = (char)toupper((unsigned char)m[i]);
    r->method[i] = '\0';
  }
  e = H->npool > 0 ? H->pool[--H->npool] : curl_easy_init();
  if (e == NULL) return luaL_error(L, "%s: cannot create a curl handle", FN);
  r->easy = e;

  if (hdr_idx) drv__build_headers(L, hdr_idx, r, &has_ctype, &has_expect);
  if (is_json && !has_ctype) {
    struct curl_slist *l = curl_slist_append(r->headers, "Content-Type: application/json");
    if (l == NULL) return luaL_error(L, "%s: out of memory", FN);
    r->headers = l;
    has_ctype = 1;
  }
  /* curl would label a raw body application/x-www-form-urlencoded; a body
   * is just bytes unless the caller says otherwise.  And no "Expect:
   * 100-continue" round trip for large bodies unless asked for. */
  if (!has_ctype && (body || strcmp(r->method, "POST") == 0)) {
    struct curl_slist *l = curl_slist_append(r->headers, "Content-Type:");
    if (l == NULL) return luaL_error(L, "%s: out of memory", FN);
    r->headers = l;
  }
  if (!has_expect) {
    struct curl_slist *l = curl_slist_append(r->headers, "Expect:");
    if (l == NULL) return luaL_error(L, "%s: out of memory", FN);
    r->headers = l;
  }

  if (cb_idx) {
    lua_State *C = lua_newthread(L);
    lua_pushvalue(L, cb_idx);
    lua_xmove(L, C, 1);
    lua_setiuservalue(L, -2, 1); /* box.uservalue = thread (anchors fn too) */
    r->cbL = C;
  }

  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
  curl_easy_setopt(e, CURLOPT_USERAGENT, "drover/" DRV_VERSION);
  curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, drv__curl_open_socket);
  curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, r);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, drv__curl_write_cb);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, drv__curl_header_cb);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
  if (r->headers) curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
  if (timeout > 0) {
    long ms = (long)(timeout * 1000.0 + 0.999);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, ms < 1 ? 1L : ms);
  }
  if (unix_socket) curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, unix_socket);
  if (ca_file) curl_easy_setopt(e, CURLOPT_CAINFO, ca_file); /* a private CA (drover serve --tls-cert) */
  if (insecure) {
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  /* The method.  A body always goes through POSTFIELDS (copied, so the Lua
   * string may go away); other methods rename the request line.  POST, PUT
   * and PATCH without a body still send "Content-Length: 0". */
  if (body || strcmp(r->method, "POST") == 0 || strcmp(r->method, "PUT") == 0 ||
      strcmp(r->method, "PATCH") == 0) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    if (curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, body ? body : "") != CURLE_OK)
      return luaL_error(L, "%s: out of memory", FN);
    if (strcmp(r->method, "POST") != 0) curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, r->method);
  } else if (strcmp(r->method, "HEAD") == 0) {
    curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
  } else if (strcmp(r->method, "GET") != 0) {
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, r->method);
  }

  r->wait = w;
  r->wait.cancel = drv__req_cancel;
  if (curl_multi_add_handle(H->multi, e) != CURLM_OK)
    return luaL_error(L, "%s: cannot start the transfer", FN);
  r->state = R_ACTIVE;
  /* Stack for the continuation: 1 = opts, 2 = box. */
  lua_replace(L, 2);
  lua_settop(L, 2);
  return drv__awaitk(L, &r->wait, drv__req_k, 0);
}

/* Push the headers table: lower-case names, repeated headers joined with
 * ", " (RFC 9110 5.3). */
static void drv__push_headers(lua_State *L, drv_req *r) {
  size_t i = 0;
  lua_newtable(L);
  while (i < r->hdrs_len) {
    const char *name = r->hdrs + i, *value;
    size_t nl = strlen(name), vl;
    value = name + nl + 1;
    vl = strlen(value);
    i += nl + vl + 2;
    lua_pushlstring(L, name, nl);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, -3) == LUA_TSTRING) {
      lua_pushliteral(L, ", ");
      lua_pushlstring(L, value, vl);
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushlstring(L, value, vl);
    }
    lua_rawset(L, -3);
  }
}

/* The continuation: runs in the waiting task (or the blocked main thread)
 * once the transfer is over. */
static int drv__req_k(lua_State *L, int status, lua_KContext ctx) {
  drv_req_box *box = (drv_req_box *)luaL_checkudata(L, 2, DRV_REQ_MT);
  drv_req *r = box->r;
  long code = 0;
  (void)status;
  (void)ctx;
  if (r == NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: the engine was closed", FN);
    return 2;
  }
  if (r->cb_err || r->oom || r->code != CURLE_OK) {
    lua_pushnil(L);
    if (r->oom)
      lua_pushfstring(L, "%s: %s %s failed: out of memory", FN, r->method, r->url);
    else if (r->cb_err)
      lua_pushfstring(L, "%s: %s %s failed: on_chunk: %s", FN, r->method, r->url, r->cb_err);
    else if (r->code == CURLE_COULDNT_CONNECT && r->socket_errno)
      lua_pushfstring(L, "%s: %s %s failed: cannot open a socket: %s", FN, r->method, r->url,
                      uv_strerror(uv_translate_sys_error(r->socket_errno)));
    else if (r->errbuf[0] && strcmp(r->errbuf, curl_easy_strerror(r->code)) != 0)
      lua_pushfstring(L, "%s: %s %s failed: %s (%s)", FN, r->method, r->url,
                      curl_easy_strerror(r->code), r->errbuf);
    else
      lua_pushfstring(L, "%s: %s %s failed: %s", FN, r->method, r->url,
                      curl_easy_strerror(r->code));
    drv__req_free(r);
    return 2;
  }
  curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &code);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, code);
  lua_setfield(L, -2, "status");
  drv__push_headers(L, r);
  lua_setfield(L, -2, "headers");
  lua_pushlstring(L, r->body ? r->body : "", r->body_len);
  lua_setfield(L, -2, "body");
  drv__req_free(r);
  return 1;
}

static int drv__req_tostring(lua_State *L) {
  drv_req_box *box = (drv_req_box *)luaL_checkudata(L, 1, DRV_REQ_MT);
  if (box->r) lua_pushfstring(L, "drover.http.request(%s %s)", box->r->method, box->r->url);
  else lua_pushliteral(L, "drover.http.request(done)");
  return 1;
}

int drv__open_http(lua_State *L) {
  static const luaL_Reg funcs[] = {{"request", drv__l_request}, {NULL, NULL}};
  if (luaL_newmetatable(L, DRV_REQ_MT)) {
    lua_pushcfunction(L, drv__box_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, drv__req_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "drover.http.request");
    lua_setfield(L, -2, "__metatable");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
