/*
 * pset.c -- many descriptors behind one libuv watch: an epoll set of our
 * own, which the loop sees as a single readable fd.
 *
 * Each child drover starts has a pidfd and, when its output is captured,
 * two pipes.  Handed to libuv one by one, every one of them costs a round
 * of probing and bookkeeping syscalls: uv_poll_init tries an epoll ADD and
 * DEL to see that the fd can be polled and sets it non-blocking,
 * uv_pipe_open asks for its flags and sets it non-blocking again, the
 * watch is added on the next loop turn and deleted again when the handle
 * closes -- nine epoll_ctl, three ioctl and three fcntl per child, on a
 * machine where a syscall is a microsecond or more.  In this set a
 * descriptor costs one epoll_ctl ADD; closing it takes it out of the set
 * (the kernel drops an epoll registration when the last descriptor of the
 * open file goes, and these are close-on-exec fds only drover holds).
 *
 * Level-triggered, like libuv: an entry whose callback read only part of
 * what was ready is reported again on the next turn.
 *
 * An entry is named in the kernel by its slot (an index into `slots`) and
 * the slot's generation, never by a pointer: an event the kernel queued
 * for an entry removed in the meantime (by an earlier callback of the same
 * batch, say, which freed its owner) finds another generation and is
 * dropped, instead of reaching freed memory.
 */
#include "drover_int.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#define DRV_PSET_BATCH 64

typedef struct {
  drv_pent *ent;       /* NULL: free */
  uint32_t gen;        /* bumped each time the slot is freed */
  uint32_t next_free;  /* free list link (index + 1; 0 ends it) */
} drv_pslot;

struct drv_pset {
  drv_res res;         /* the engine closes the set (after the processes: LIFO) */
  uv_poll_t poll;      /* libuv's watch on epfd */
  int epfd;
  int held;            /* entries that keep the loop alive */
  int nent;            /* entries in the set */
  int closed;          /* the engine closed it: no more events */
  int poll_closed;     /* ... and the poll handle's close callback ran */
  drv_pslot *slots;
  uint32_t nslots;
  uint32_t free_head;  /* index + 1 of the first free slot; 0: none */
};

static void drv__pset_maybe_free(drv_pset *s) {
  if (!s->closed || !s->poll_closed || s->nent > 0) return;
  free(s->slots);
  free(s);
}

static void drv__pset_poll_closed(uv_handle_t *h) {
  drv_pset *s = (drv_pset *)h->data;
  s->poll_closed = 1;
  drv__pset_maybe_free(s);
}

/* The engine is closing.  Entries still in the set belong to owners whose
 * own close comes later; their drv__pset_del still works (the memory stays
 * until the last one is gone), it just closes the fd. */
static void drv__pset_res_close(drv_res *r) {
  drv_pset *s = (drv_pset *)r;
  drv__res_unlink(r);
  s->closed = 1;
  uv_close((uv_handle_t *)&s->poll, drv__pset_poll_closed);
  close(s->epfd); /* after uv_close took it out of libuv's own set */
  s->epfd = -1;
}

static void drv__pset_ready(uv_poll_t *h, int status, int events) {
  drv_pset *s = (drv_pset *)h->data;
  struct epoll_event ev[DRV_PSET_BATCH];
  int n, i;
  (void)status;
  (void)events;
  do n = epoll_wait(s->epfd, ev, DRV_PSET_BATCH, 0);
  while (n < 0 && errno == EINTR);
  for (i = 0; i < n && !s->closed; i++) {
    uint32_t slot = (uint32_t)ev[i].data.u64, gen = (uint32_t)(ev[i].data.u64 >> 32);
    drv_pent *e;
    if (slot >= s->nslots || s->slots[slot].gen != gen) continue; /* removed meanwhile */
    e = s->slots[slot].ent;
    if (e != NULL) e->cb(e);
  }
}

drv_pset *drv__pset_new(drv_engine *E) {
  drv_pset *s = (drv_pset *)calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  s->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (s->epfd < 0 || uv_poll_init(E->loop, &s->poll, s->epfd) != 0) {
    if (s->epfd >= 0) close(s->epfd);
    free(s);
    return NULL;
  }
  s->poll.data = s;
  uv_poll_start(&s->poll, UV_READABLE, drv__pset_ready);
  uv_unref((uv_handle_t *)&s->poll); /* until an entry is held */
  drv__res_link(E, &s->res, drv__pset_res_close);
  return s;
}

int drv__pset_add(drv_pset *s, drv_pent *e, int fd, drv_pent_cb cb) {
  struct epoll_event ev;
  uint32_t slot;
  if (s->closed) return UV_EBADF;
  if (s->free_head == 0) {
    uint32_t n = s->nslots ? s->nslots * 2 : 16, i;
    drv_pslot *ns = (drv_pslot *)realloc(s->slots, n * sizeof *ns);
    if (ns == NULL) return UV_ENOMEM;
    for (i = s->nslots; i < n; i++) {
      ns[i].ent = NULL;
      ns[i].gen = 0;
      ns[i].next_free = i + 1 < n ? i + 2 : 0;
    }
    s->slots = ns;
    s->free_head = s->nslots + 1;
    s->nslots = n;
  }
  slot = s->free_head - 1;
  ev.events = EPOLLIN;
  ev.data.u64 = (uint64_t)slot | ((uint64_t)s->slots[slot].gen << 32);
  if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) return uv_translate_sys_error(errno);
  s->free_head = s->slots[slot].next_free;
  s->slots[slot].ent = e;
  e->fd = fd;
  e->slot = slot;
  e->cb = cb;
  e->held = 0;
  s->nent++;
  return 0;
}

void drv__pset_hold(drv_pset *s, drv_pent *e, int on) {
  on = on != 0;
  if (e->fd < 0 || e->held == on) return;
  e->held = on;
  s->held += on ? 1 : -1;
  if (s->closed) return;
  if (on && s->held == 1) uv_ref((uv_handle_t *)&s->poll);
  else if (!on && s->held == 0) uv_unref((uv_handle_t *)&s->poll);
}

void drv__pset_del(drv_pset *s, drv_pent *e) {
  drv_pslot *sl;
  if (e->fd < 0) return;
  drv__pset_hold(s, e, 0);
  sl = &s->slots[e->slot];
  sl->ent = NULL;
  sl->gen++;
  sl->next_free = s->free_head;
  s->free_head = e->slot + 1;
  close(e->fd); /* the last descriptor of it: the kernel drops it from epfd */
  e->fd = -1;
  s->nent--;
  drv__pset_maybe_free(s);
}
