/*
 * httpd.c -- the HTTP server drover's tests and benchmarks talk to.
 *
 * A small H2O (libuv flavour) server: one thread, one loop, no blocking.
 * Slow endpoints use libuv timers, so a test can hold a hundred requests
 * open at once and the server still answers the next one immediately.
 *
 *   httpd-test PORT [UNIX_SOCKET_PATH]
 *
 * listens on 127.0.0.1:PORT (0 = pick a free port) and, if given, on a unix
 * socket.  The first line on stdout is the port actually bound, so a test
 * can start the server with port 0 and read where it went.  SIGTERM/SIGINT
 * stop it cleanly (the socket file is removed); on Linux it also stops when
 * its parent dies, so a crashed test run leaves no server behind.
 *
 * Endpoints (anything else is 404):
 *   /                 "hello\n" (the benchmark's target)
 *   /echo             JSON {method, path, query, headers, body, body_length};
 *                     ?omit_body=1 leaves body out (for large uploads);
 *                     response headers: x-echo-method, and x-multi twice
 *   /status/N         status N, small text body
 *   /json             a valid JSON document
 *   /bad-json         content-type application/json, malformed body
 *   /delay?ms=N       answers after N ms (timer), JSON {"ms": N}
 *   /stream?n=N&ms=M  chunked: N chunks "chunk I\n", one every M ms (def. 20)
 *   /conn             JSON {"conn": id of the TCP connection}
 *   /bytes?n=N        N bytes: byte i is 'a' + i % 26
 *   /barrier?n=N      held until N barrier requests are pending, then all
 *                     are answered: proves N requests really are in flight
 *   /stats            JSON {"pending": delayed/barrier requests not yet
 *                     answered whose client is still connected}
 */
#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <uv.h>
#include "h2o.h"
#include "h2o/http1.h"

static h2o_globalconf_t config;
static h2o_context_t ctx;
static h2o_accept_ctx_t accept_ctx;
static uv_tcp_t tcp_listener;
static uv_pipe_t unix_listener;
static const char *unix_path;

/* ---- small helpers ------------------------------------------------------- */

typedef struct {
  char *p;
  size_t len, cap;
} buf_t;

static void buf_add(buf_t *b, const char *s, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) cap *= 2;
    b->p = realloc(b->p, cap);
    if (b->p == NULL) abort();
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void buf_str(buf_t *b, const char *s) { buf_add(b, s, strlen(s)); }

/* JSON string literal; bytes >= 0x80 pass through (tests send UTF-8). */
static void buf_json(buf_t *b, const char *s, size_t n) {
  size_t i;
  buf_add(b, "\"", 1);
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[8];
    if (c == '"' || c == '\\') {
      esc[0] = '\\';
      esc[1] = (char)c;
      buf_add(b, esc, 2);
    } else if (c < 0x20) {
      snprintf(esc, sizeof esc, "\\u%04x", c);
      buf_add(b, esc, 6);
    } else {
      buf_add(b, (const char *)&s[i], 1);
    }
  }
  buf_add(b, "\"", 1);
}

static int path_is(h2o_req_t *req, const char *p) {
  return h2o_memis(req->path_normalized.base, req->path_normalized.len, p, strlen(p));
}

/* Value of query parameter `name`, or dflt. */
static long query_long(h2o_req_t *req, const char *name, long dflt) {
  const char *q, *end;
  size_t nl = strlen(name);
  if (req->query_at == SIZE_MAX) return dflt;
  q = req->path.base + req->query_at + 1;
  end = req->path.base + req->path.len;
  while (q < end) {
    const char *amp = memchr(q, '&', (size_t)(end - q));
    const char *stop = amp ? amp : end;
    if ((size_t)(stop - q) > nl && memcmp(q, name, nl) == 0 && q[nl] == '=') {
      char tmp[32];
      size_t vl = (size_t)(stop - q) - nl - 1;
      if (vl >= sizeof tmp) vl = sizeof tmp - 1;
      memcpy(tmp, q + nl + 1, vl);
      tmp[vl] = '\0';
      return strtol(tmp, NULL, 10);
    }
    q = amp ? amp + 1 : end;
  }
  return dflt;
}

static void respond(h2o_req_t *req, int status, const char *ctype, const char *body, size_t len) {
  static h2o_generator_t gen = {NULL, NULL};
  h2o_iovec_t b;
  req->res.status = status;
  req->res.reason = status < 400 ? "OK" : "Error";
  if (ctype)
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, ctype, strlen(ctype));
  b.base = h2o_mem_alloc_pool(&req->pool, len + 1);
  memcpy(b.base, body, len);
  b.len = len;
  req->res.content_length = len;
  h2o_start_response(req, &gen);
  h2o_send(req, &b, 1, H2O_SEND_STATE_FINAL);
}

static void respond_str(h2o_req_t *req, int status, const char *ctype, const char *body) {
  respond(req, status, ctype, body, strlen(body));
}

/* ---- timers tied to a request's lifetime ---------------------------------- */

/* A libuv timer must outlive its uv_close, while the request (and its pool)
 * can vanish at any time when the client disconnects.  So the timer is
 * malloc'd, and a small object in the request's pool closes it when the
 * pool is cleared; the timer callback checks `req` before touching it. */
typedef struct req_timer req_timer;
struct req_timer {
  uv_timer_t t;
  h2o_req_t *req; /* NULL once the request is gone */
  void (*fire)(req_timer *);
  void *data;
  int counted; /* in the `delayed` list */
  req_timer *next_waiter;
  req_timer *prev_delayed, *next_delayed;
};

/* /delay and /barrier requests not answered yet. */
static req_timer *delayed;

static void delayed_add(req_timer *rt) {
  rt->counted = 1;
  rt->prev_delayed = NULL;
  rt->next_delayed = delayed;
  if (delayed) delayed->prev_delayed = rt;
  delayed = rt;
}

static void delayed_remove(req_timer *rt) {
  if (!rt->counted) return;
  rt->counted = 0;
  if (rt->prev_delayed) rt->prev_delayed->next_delayed = rt->next_delayed;
  else delayed = rt->next_delayed;
  if (rt->next_delayed) rt->next_delayed->prev_delayed = rt->prev_delayed;
}

/* HTTP/1 in H2O does not read from a connection while its request is being
 * handled, so it only notices a client that hung up when it writes the
 * response.  /stats and /barrier want to know now: peek at the socket. */
static int peer_gone(h2o_req_t *req) {
  h2o_socket_t *sock = req->conn->callbacks->get_socket ? req->conn->callbacks->get_socket(req->conn) : NULL;
  char c;
  ssize_t n;
  int fd;
  if (sock == NULL || (fd = h2o_socket_get_fd(sock)) < 0) return 0;
  n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static long live_delayed(void) {
  long n = 0;
  req_timer *rt;
  for (rt = delayed; rt; rt = rt->next_delayed)
    if (rt->req && !peer_gone(rt->req)) n++;
  return n;
}

static req_timer *barrier_waiters; /* see /barrier */

static void req_timer_closed(uv_handle_t *h) { free(h->data); }

static void req_timer_dispose(void *p) {
  req_timer *rt = *(req_timer **)p, **pp;
  rt->req = NULL;
  delayed_remove(rt);
  for (pp = &barrier_waiters; *pp; pp = &(*pp)->next_waiter) {
    if (*pp == rt) {
      *pp = rt->next_waiter;
      break;
    }
  }
  uv_timer_stop(&rt->t);
  uv_close((uv_handle_t *)&rt->t, req_timer_closed);
}

static void req_timer_cb(uv_timer_t *h) {
  req_timer *rt = h->data;
  if (rt->req) rt->fire(rt);
}

static req_timer *req_timer_new(h2o_req_t *req, void (*fire)(req_timer *)) {
  req_timer *rt = calloc(1, sizeof *rt);
  req_timer **slot;
  if (rt == NULL) abort();
  rt->req = req;
  rt->fire = fire;
  uv_timer_init(ctx.loop, &rt->t);
  rt->t.data = rt;
  slot = h2o_mem_alloc_shared(&req->pool, sizeof *slot, req_timer_dispose);
  *slot = rt;
  return rt;
}

/* ---- endpoints ------------------------------------------------------------ */

static int on_echo(h2o_req_t *req) {
  buf_t b = {0};
  size_t i;
  char num[32];
  buf_str(&b, "{\"method\":");
  buf_json(&b, req->method.base, req->method.len);
  buf_str(&b, ",\"path\":");
  buf_json(&b, req->path_normalized.base, req->path_normalized.len);
  buf_str(&b, ",\"query\":");
  if (req->query_at != SIZE_MAX)
    buf_json(&b, req->path.base + req->query_at + 1, req->path.len - req->query_at - 1);
  else
    buf_str(&b, "\"\"");
  buf_str(&b, ",\"headers\":{");
  for (i = 0; i != req->headers.size; i++) {
    h2o_header_t *h = req->headers.entries + i;
    char name[256];
    size_t j, nl = h->name->len < sizeof name ? h->name->len : sizeof name - 1;
    for (j = 0; j < nl; j++) name[j] = (char)tolower((unsigned char)h->name->base[j]);
    if (i) buf_str(&b, ",");
    buf_json(&b, name, nl);
    buf_str(&b, ":");
    buf_json(&b, h->value.base, h->value.len);
  }
  buf_str(&b, "}");
  if (query_long(req, "omit_body", 0) == 0) {
    buf_str(&b, ",\"body\":");
    buf_json(&b, req->entity.base ? req->entity.base : "", req->entity.base ? req->entity.len : 0);
  }
  snprintf(num, sizeof num, "%zu", req->entity.base ? req->entity.len : 0);
  buf_str(&b, ",\"body_length\":");
  buf_str(&b, num);
  buf_str(&b, "}");
  h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("x-echo-method"), 0, NULL,
                        req->method.base, req->method.len);
  h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("x-multi"), 0, NULL,
                        H2O_STRLIT("a"));
  h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("x-multi"), 0, NULL,
                        H2O_STRLIT("b"));
  respond(req, 200, "application/json", b.p, b.len);
  free(b.p);
  return 0;
}

static void delay_fire(req_timer *rt) {
  char body[64];
  snprintf(body, sizeof body, "{\"ms\":%ld}", (long)(intptr_t)rt->data);
  delayed_remove(rt);
  respond_str(rt->req, 200, "application/json", body);
}

static int on_delay(h2o_req_t *req) {
  long ms = query_long(req, "ms", 100);
  req_timer *rt = req_timer_new(req, delay_fire);
  if (ms < 0) ms = 0;
  rt->data = (void *)(intptr_t)ms;
  delayed_add(rt);
  uv_timer_start(&rt->t, req_timer_cb, (uint64_t)ms, 0);
  return 0;
}

/* /barrier: waiters are linked through their timers (which are never
 * started: they are there for the pool-tied lifetime, so a client that gives
 * up is unlinked and no longer counted). */

static void barrier_release(void) {
  req_timer *rt = barrier_waiters;
  barrier_waiters = NULL;
  while (rt) {
    req_timer *next = rt->next_waiter;
    rt->next_waiter = NULL;
    {
      delayed_remove(rt);
      respond_str(rt->req, 200, "application/json", "{\"released\":true}");
    }
    rt = next;
  }
}

static int on_barrier(h2o_req_t *req) {
  long n = query_long(req, "n", 2), live = 0;
  req_timer *rt = req_timer_new(req, delay_fire), *w;
  delayed_add(rt);
  rt->next_waiter = barrier_waiters;
  barrier_waiters = rt;
  for (w = barrier_waiters; w; w = w->next_waiter)
    if (!peer_gone(w->req)) live++;
  if (live >= n) barrier_release();
  return 0;
}

typedef struct {
  h2o_generator_t super;
  h2o_req_t *req;
  req_timer *rt;
  long sent, total;
  int can_send, due;
  char chunk[64];
} stream_gen;

static void stream_try_send(stream_gen *g) {
  h2o_iovec_t b;
  int final;
  if (!g->can_send || !g->due || g->sent >= g->total) return;
  g->can_send = g->due = 0;
  b.len = (size_t)snprintf(g->chunk, sizeof g->chunk, "chunk %ld\n", g->sent);
  b.base = g->chunk;
  g->sent++;
  final = g->sent >= g->total;
  if (final) uv_timer_stop(&g->rt->t);
  h2o_send(g->req, &b, 1, final ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_IN_PROGRESS);
}

static void stream_proceed(h2o_generator_t *self, h2o_req_t *req) {
  stream_gen *g = (stream_gen *)self;
  g->can_send = 1;
  stream_try_send(g);
}

static void stream_stop(h2o_generator_t *self, h2o_req_t *req) {
  stream_gen *g = (stream_gen *)self;
  uv_timer_stop(&g->rt->t);
  g->total = g->sent;
}

static void stream_tick(req_timer *rt) {
  stream_gen *g = rt->data;
  g->due = 1;
  stream_try_send(g);
}

static int on_stream(h2o_req_t *req) {
  long n = query_long(req, "n", 5), ms = query_long(req, "ms", 20);
  stream_gen *g = h2o_mem_alloc_pool(&req->pool, sizeof *g);
  memset(g, 0, sizeof *g);
  if (n < 1) n = 1;
  if (ms < 1) ms = 1;
  g->super.proceed = stream_proceed;
  g->super.stop = stream_stop;
  g->req = req;
  g->total = n;
  g->rt = req_timer_new(req, stream_tick);
  g->rt->data = g;
  req->res.status = 200;
  req->res.reason = "OK";
  h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, H2O_STRLIT("text/plain"));
  h2o_start_response(req, &g->super);
  g->can_send = g->due = 1; /* the first chunk goes out at once */
  uv_timer_start(&g->rt->t, req_timer_cb, (uint64_t)ms, (uint64_t)ms);
  stream_try_send(g);
  return 0;
}

static int on_bytes(h2o_req_t *req) {
  static h2o_generator_t gen = {NULL, NULL};
  long n = query_long(req, "n", 1024), i;
  h2o_iovec_t b;
  if (n < 0) n = 0;
  b.base = h2o_mem_alloc_pool(&req->pool, (size_t)n + 1);
  for (i = 0; i < n; i++) b.base[i] = (char)('a' + i % 26);
  b.len = (size_t)n;
  req->res.status = 200;
  req->res.reason = "OK";
  req->res.content_length = (size_t)n;
  h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL,
                 H2O_STRLIT("application/octet-stream"));
  h2o_start_response(req, &gen);
  h2o_send(req, &b, 1, H2O_SEND_STATE_FINAL);
  return 0;
}

static int on_req(h2o_handler_t *self, h2o_req_t *req) {
  char body[128];
  if (path_is(req, "/")) {
    respond_str(req, 200, "text/plain", "hello\n");
  } else if (path_is(req, "/echo")) {
    return on_echo(req);
  } else if (req->path_normalized.len > 8 &&
             memcmp(req->path_normalized.base, "/status/", 8) == 0) {
    char num[8];
    size_t l = req->path_normalized.len - 8;
    long st;
    if (l >= sizeof num) l = sizeof num - 1;
    memcpy(num, req->path_normalized.base + 8, l);
    num[l] = '\0';
    st = strtol(num, NULL, 10);
    if (st < 100 || st > 599) st = 400;
    snprintf(body, sizeof body, "status %ld\n", st);
    if (st == 204 || st == 304)
      respond(req, (int)st, NULL, "", 0);
    else
      respond_str(req, (int)st, "text/plain", body);
  } else if (path_is(req, "/json")) {
    respond_str(req, 200, "application/json; charset=utf-8",
                "{\"ok\":true,\"name\":\"drover\",\"items\":[1,2,3],\"nested\":{\"none\":null}}");
  } else if (path_is(req, "/bad-json")) {
    respond_str(req, 200, "application/json", "{\"ok\": tru");
  } else if (path_is(req, "/delay")) {
    return on_delay(req);
  } else if (path_is(req, "/stream")) {
    return on_stream(req);
  } else if (path_is(req, "/conn")) {
    snprintf(body, sizeof body, "{\"conn\":%llu}", (unsigned long long)req->conn->id);
    respond_str(req, 200, "application/json", body);
  } else if (path_is(req, "/bytes")) {
    return on_bytes(req);
  } else if (path_is(req, "/barrier")) {
    return on_barrier(req);
  } else if (path_is(req, "/stats")) {
    snprintf(body, sizeof body, "{\"pending\":%ld}", live_delayed());
    respond_str(req, 200, "application/json", body);
  } else {
    respond_str(req, 404, "text/plain", "not found\n");
  }
  return 0;
}

/* ---- listeners ------------------------------------------------------------ */

static void on_accept(uv_stream_t *listener, int status) {
  uv_stream_t *conn;
  h2o_socket_t *sock;
  if (status != 0) return;
  if (listener == (uv_stream_t *)&tcp_listener) {
    conn = malloc(sizeof(uv_tcp_t));
    uv_tcp_init(listener->loop, (uv_tcp_t *)conn);
    uv_tcp_nodelay((uv_tcp_t *)conn, 1);
  } else {
    conn = malloc(sizeof(uv_pipe_t));
    uv_pipe_init(listener->loop, (uv_pipe_t *)conn, 0);
  }
  if (uv_accept(listener, conn) != 0) {
    uv_close((uv_handle_t *)conn, (uv_close_cb)free);
    return;
  }
  sock = h2o_uv_socket_create(conn, (uv_close_cb)free);
  h2o_accept(&accept_ctx, sock);
}

static void on_signal(uv_signal_t *h, int signum) {
  if (unix_path) unlink(unix_path);
  exit(0);
}

int main(int argc, char **argv) {
  h2o_hostconf_t *hostconf;
  h2o_pathconf_t *pathconf;
  h2o_handler_t *handler;
  uv_loop_t loop;
  uv_signal_t sigterm, sigint;
  struct sockaddr_in addr;
  struct sockaddr_storage bound;
  int r, port, namelen = sizeof bound;

  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: %s PORT [UNIX_SOCKET_PATH]\n", argv[0]);
    return 2;
  }
  port = atoi(argv[1]);
  if (argc == 3) unix_path = argv[2];
  signal(SIGPIPE, SIG_IGN);
#ifdef __linux__
  prctl(PR_SET_PDEATHSIG, SIGTERM);
#endif

  h2o_config_init(&config);
  hostconf = h2o_config_register_host(&config, h2o_iovec_init(H2O_STRLIT("default")), 65535);
  pathconf = h2o_config_register_path(hostconf, "/", 0);
  handler = h2o_create_handler(pathconf, sizeof *handler);
  handler->on_req = on_req;

  uv_loop_init(&loop);
  h2o_context_init(&ctx, &loop, &config);
  accept_ctx.ctx = &ctx;
  accept_ctx.hosts = config.hosts;

  uv_tcp_init(&loop, &tcp_listener);
  uv_ip4_addr("127.0.0.1", port, &addr);
  if ((r = uv_tcp_bind(&tcp_listener, (struct sockaddr *)&addr, 0)) != 0 ||
      (r = uv_listen((uv_stream_t *)&tcp_listener, 1024, on_accept)) != 0) {
    fprintf(stderr, "httpd-test: cannot listen on 127.0.0.1:%d: %s\n", port, uv_strerror(r));
    return 1;
  }
  uv_tcp_getsockname(&tcp_listener, (struct sockaddr *)&bound, &namelen);
  port = ntohs(((struct sockaddr_in *)&bound)->sin_port);

  if (unix_path) {
    unlink(unix_path);
    uv_pipe_init(&loop, &unix_listener, 0);
    if ((r = uv_pipe_bind(&unix_listener, unix_path)) != 0 ||
        (r = uv_listen((uv_stream_t *)&unix_listener, 1024, on_accept)) != 0) {
      fprintf(stderr, "httpd-test: cannot listen on %s: %s\n", unix_path, uv_strerror(r));
      return 1;
    }
  }

  uv_signal_init(&loop, &sigterm);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_init(&loop, &sigint);
  uv_signal_start(&sigint, on_signal, SIGINT);

  printf("%d\n", port);
  fflush(stdout);
  return uv_run(&loop, UV_RUN_DEFAULT);
}
