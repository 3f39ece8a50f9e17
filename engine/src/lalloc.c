/*
 * lalloc.c -- the allocator of the Lua states drover_open makes: small
 * blocks from free lists, one per size class, carved out of 64 KB slabs.
 *
 * Lua allocates and frees a great many small blocks (tables, strings,
 * closures, coroutines), and it frees them in bursts, from its collector's
 * sweep.  glibc's malloc serves a small block fast from its per-thread
 * cache only while that cache holds one (seven per size); a sweep's frees
 * overflow it into the bins, and the next allocations come back through
 * _int_malloc, with a malloc_consolidate now and then: callgrind counted
 * ~200 instructions per Lua allocation in a tracked DAG run, and a fifth of
 * the engine's instructions per task in malloc and free.  Here a small
 * block costs a few instructions either way: Lua tells the allocator the
 * size of every block it frees or resizes, so a block needs no header,
 * and its size picks its list.
 *
 * Blocks of more than DRV_LALLOC_MAX bytes, and every block of a build
 * with AddressSanitizer (which must see each allocation to check it), go
 * to realloc and free.  Free blocks are kept for reuse, in their class,
 * not given back to malloc: the pool is as big as the most the state ever
 * had live of each size, and all of it is freed with the state.
 */
#include "drover_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#define DRV_LALLOC_POOL 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DRV_LALLOC_POOL 0
#endif
#endif
#ifndef DRV_LALLOC_POOL
#define DRV_LALLOC_POOL 1
#endif

#define DRV_LALLOC_MAX 256                       /* bytes: larger blocks come from malloc */
#define DRV_LALLOC_STEP 16                       /* class i holds blocks of (i+1)*STEP bytes */
#define DRV_LALLOC_CLASSES (DRV_LALLOC_MAX / DRV_LALLOC_STEP)
#define DRV_LALLOC_SLAB (64 * 1024)

struct drv_lalloc {
  void *free[DRV_LALLOC_CLASSES]; /* each free block's first word links the next */
  char *cur, *end;                /* what is left of the newest slab */
  void *slabs;                    /* every slab, linked through its first word */
};

#define DRV_CLASS(n) (((n) - 1) / DRV_LALLOC_STEP)

static void *drv__lalloc_get(drv_lalloc *A, size_t n) {
  size_t c = DRV_CLASS(n), size;
  void *b = A->free[c];
  if (b != NULL) {
    A->free[c] = *(void **)b;
    return b;
  }
  size = (c + 1) * DRV_LALLOC_STEP;
  if ((size_t)(A->end - A->cur) < size) {
    char *s = (char *)malloc(DRV_LALLOC_SLAB);
    if (s == NULL) return NULL;
    *(void **)s = A->slabs;
    A->slabs = s;
    A->cur = s + DRV_LALLOC_STEP; /* the link, then blocks 16-aligned like malloc's */
    A->end = s + DRV_LALLOC_SLAB;
  }
  b = A->cur;
  A->cur += size;
  return b;
}

static void drv__lalloc_put(drv_lalloc *A, void *b, size_t n) {
  size_t c = DRV_CLASS(n);
  *(void **)b = A->free[c];
  A->free[c] = b;
}

/* lua_Alloc.  For a new block (ptr NULL) osize is the kind of object, not
 * a size.  Lua counts on a block that shrinks never failing to. */
static void *drv__lalloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  drv_lalloc *A = (drv_lalloc *)ud;
  void *nb;
  if (!DRV_LALLOC_POOL || A == NULL) {
    if (nsize == 0) {
      free(ptr);
      return NULL;
    }
    return realloc(ptr, nsize);
  }
  if (ptr == NULL) osize = 0;
  if (nsize == 0) {
    if (ptr != NULL) {
      if (osize <= DRV_LALLOC_MAX) drv__lalloc_put(A, ptr, osize);
      else free(ptr);
    }
    return NULL;
  }
  if (osize > DRV_LALLOC_MAX) { /* a malloc block */
    if (nsize > DRV_LALLOC_MAX) return realloc(ptr, nsize);
    nb = drv__lalloc_get(A, nsize);
    /* out of memory while shrinking, which Lua takes never to fail: keep
     * the bigger block (freed, it joins the pool; only then is it lost) */
    if (nb == NULL) return ptr;
    memcpy(nb, ptr, nsize);
    free(ptr);
    return nb;
  }
  /* a pool block, or none */
  if (ptr != NULL && nsize <= DRV_LALLOC_MAX && DRV_CLASS(osize) == DRV_CLASS(nsize)) return ptr;
  nb = nsize <= DRV_LALLOC_MAX ? drv__lalloc_get(A, nsize) : malloc(nsize);
  if (nb == NULL) return ptr != NULL && nsize <= osize ? ptr : NULL; /* shrinking: keep the block */
  if (ptr != NULL) {
    memcpy(nb, ptr, osize < nsize ? osize : nsize);
    drv__lalloc_put(A, ptr, osize);
  }
  return nb;
}

drv_lalloc *drv__lalloc_new(void) {
  return DRV_LALLOC_POOL ? (drv_lalloc *)calloc(1, sizeof(drv_lalloc)) : NULL;
}

void drv__lalloc_free(drv_lalloc *A) {
  if (A == NULL) return;
  while (A->slabs != NULL) {
    void *next = *(void **)A->slabs;
    free(A->slabs);
    A->slabs = next;
  }
  free(A);
}

/* ---- what luaL_newstate adds to lua_newstate (lauxlib.c's, unchanged) ---- */

static int drv__panic(lua_State *L) {
  const char *msg = lua_tostring(L, -1);
  if (msg == NULL) msg = "error object is not a string";
  fprintf(stderr, "PANIC: unprotected error in call to Lua API (%s)\n", msg);
  fflush(stderr);
  return 0; /* return to Lua to abort */
}

static void drv__warn_off(void *ud, const char *message, int tocont);
static void drv__warn_on(void *ud, const char *message, int tocont);

/* "@on" / "@off" switch warnings; returns 1 for such a control message. */
static int drv__warn_control(lua_State *L, const char *message, int tocont) {
  if (tocont || *(message++) != '@') return 0;
  if (strcmp(message, "off") == 0) lua_setwarnf(L, drv__warn_off, L);
  else if (strcmp(message, "on") == 0) lua_setwarnf(L, drv__warn_on, L);
  return 1;
}

static void drv__warn_off(void *ud, const char *message, int tocont) {
  drv__warn_control((lua_State *)ud, message, tocont);
}

static void drv__warn_cont(void *ud, const char *message, int tocont) {
  lua_State *L = (lua_State *)ud;
  fputs(message, stderr);
  if (tocont) {
    lua_setwarnf(L, drv__warn_cont, L);
  } else {
    fputs("\n", stderr);
    lua_setwarnf(L, drv__warn_on, L);
  }
  fflush(stderr);
}

static void drv__warn_on(void *ud, const char *message, int tocont) {
  if (drv__warn_control((lua_State *)ud, message, tocont)) return;
  fputs("Lua warning: ", stderr);
  drv__warn_cont(ud, message, tocont);
}

lua_State *drv__lalloc_newstate(drv_lalloc *A) {
  lua_State *L = lua_newstate(drv__lalloc, A);
  if (L != NULL) {
    lua_atpanic(L, drv__panic);
    lua_setwarnf(L, drv__warn_off, L); /* warnings off until "@on", as luaL_newstate */
  }
  return L;
}
