/*
 * lazylib.c -- dlopen libcurl and libcrypto on first use (see lazylib.h).
 *
 * Each library is opened once per process and never closed: its symbols
 * may be in use by any engine of the process.  The sonames are the ones
 * Debian 12's -dev packages link against (libcurl.so.4, libcrypto.so.3).
 */
#define DROVER_LAZYLIB_IMPL 1
#include "lazylib.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

drv_curl_api drv__curl;
drv_crypto_api drv__crypto;

static pthread_mutex_t drv__dl_lock = PTHREAD_MUTEX_INITIALIZER;

/* Open `soname` and fill every slot; NULL on success.  `err` is static per
 * library: the message stays valid for the caller. */
const char *drv__dl_load(const char *soname, const drv_sym *syms, int *loaded,
                         char *err, size_t errlen) {
  void *h;
  int i;
  pthread_mutex_lock(&drv__dl_lock);
  if (*loaded) {
    pthread_mutex_unlock(&drv__dl_lock);
    return *loaded > 0 ? NULL : err;
  }
  h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) {
    snprintf(err, errlen, "cannot load %s: %s", soname, dlerror());
    *loaded = -1;
    pthread_mutex_unlock(&drv__dl_lock);
    return err;
  }
  for (i = 0; syms[i].name; i++) {
    void *p = dlsym(h, syms[i].name);
    if (p == NULL) {
      snprintf(err, errlen, "%s has no symbol %s", soname, syms[i].name);
      *loaded = -1;
      pthread_mutex_unlock(&drv__dl_lock);
      return err;
    }
    *syms[i].slot = p;
  }
  *loaded = 1;
  pthread_mutex_unlock(&drv__dl_lock);
  return NULL;
}

#define SYM(api, field, name) {name, (void **)&api.field}

const char *drv__curl_load(void) {
  static int loaded;
  static char err[512];
  static const drv_sym syms[] = {
      SYM(drv__curl, global_init, "curl_global_init"),
      SYM(drv__curl, global_cleanup, "curl_global_cleanup"),
      SYM(drv__curl, easy_init, "curl_easy_init"),
      SYM(drv__curl, easy_cleanup, "curl_easy_cleanup"),
      SYM(drv__curl, easy_reset, "curl_easy_reset"),
      SYM(drv__curl, easy_setopt, "curl_easy_setopt"),
      SYM(drv__curl, easy_getinfo, "curl_easy_getinfo"),
      SYM(drv__curl, easy_strerror, "curl_easy_strerror"),
      SYM(drv__curl, multi_init, "curl_multi_init"),
      SYM(drv__curl, multi_cleanup, "curl_multi_cleanup"),
      SYM(drv__curl, multi_add_handle, "curl_multi_add_handle"),
      SYM(drv__curl, multi_remove_handle, "curl_multi_remove_handle"),
      SYM(drv__curl, multi_setopt, "curl_multi_setopt"),
      SYM(drv__curl, multi_assign, "curl_multi_assign"),
      SYM(drv__curl, multi_socket_action, "curl_multi_socket_action"),
      SYM(drv__curl, multi_info_read, "curl_multi_info_read"),
      SYM(drv__curl, slist_append, "curl_slist_append"),
      SYM(drv__curl, slist_free_all, "curl_slist_free_all"),
      {NULL, NULL}};
  return drv__dl_load("libcurl.so.4", syms, &loaded, err, sizeof err);
}

const char *drv__crypto_load(void) {
  static int loaded;
  static char err[512];
  static const drv_sym syms[] = {
      SYM(drv__crypto, md_ctx_new, "EVP_MD_CTX_new"),
      SYM(drv__crypto, md_ctx_free, "EVP_MD_CTX_free"),
      SYM(drv__crypto, sha256, "EVP_sha256"),
      SYM(drv__crypto, digest_init_ex, "EVP_DigestInit_ex"),
      SYM(drv__crypto, digest_update, "EVP_DigestUpdate"),
      SYM(drv__crypto, digest_final_ex, "EVP_DigestFinal_ex"),
      SYM(drv__crypto, digest, "EVP_Digest"),
      {NULL, NULL}};
  return drv__dl_load("libcrypto.so.3", syms, &loaded, err, sizeof err);
}
