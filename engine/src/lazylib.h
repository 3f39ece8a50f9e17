/*
 * lazylib.h -- libraries drover loads on first use, not at process start.
 *
 * Linking libcurl and libcrypto directly pulls some thirty shared libraries
 * (TLS, LDAP, Kerberos, SSH, IDN...) into every start of the drover binary,
 * which made an empty script four times slower to start than lua5.4 even
 * when it never made an HTTP request.  So the engine dlopen()s them the
 * first time drover.http or sha256 needs them, and the code using them
 * calls through the tables below; the macros keep that code reading like
 * ordinary libcurl / EVP code.
 *
 * Include this instead of <curl/curl.h> / <openssl/evp.h>, and call
 * drv__curl_load() / drv__crypto_load() before the first use (they return
 * NULL on success, else a message naming the library and dlerror()).
 */
#ifndef DROVER_LAZYLIB_H
#define DROVER_LAZYLIB_H

#define CURL_DISABLE_TYPECHECK 1
#include <curl/curl.h>
#include <openssl/evp.h>

typedef struct {
  CURLcode (*global_init)(long);
  void (*global_cleanup)(void);
  CURL *(*easy_init)(void);
  void (*easy_cleanup)(CURL *);
  void (*easy_reset)(CURL *);
  CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
  CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
  const char *(*easy_strerror)(CURLcode);
  CURLM *(*multi_init)(void);
  CURLMcode (*multi_cleanup)(CURLM *);
  CURLMcode (*multi_add_handle)(CURLM *, CURL *);
  CURLMcode (*multi_remove_handle)(CURLM *, CURL *);
  CURLMcode (*multi_setopt)(CURLM *, CURLMoption, ...);
  CURLMcode (*multi_assign)(CURLM *, curl_socket_t, void *);
  CURLMcode (*multi_socket_action)(CURLM *, curl_socket_t, int, int *);
  CURLMsg *(*multi_info_read)(CURLM *, int *);
  struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
  void (*slist_free_all)(struct curl_slist *);
} drv_curl_api;

typedef struct {
  EVP_MD_CTX *(*md_ctx_new)(void);
  void (*md_ctx_free)(EVP_MD_CTX *);
  const EVP_MD *(*sha256)(void);
  int (*digest_init_ex)(EVP_MD_CTX *, const EVP_MD *, ENGINE *);
  int (*digest_update)(EVP_MD_CTX *, const void *, size_t);
  int (*digest_final_ex)(EVP_MD_CTX *, unsigned char *, unsigned int *);
  int (*digest)(const void *, size_t, unsigned char *, unsigned int *, const EVP_MD *, ENGINE *);
} drv_crypto_api;

extern drv_curl_api drv__curl;
extern drv_crypto_api drv__crypto;

const char *drv__curl_load(void);
const char *drv__crypto_load(void);

/* The loader itself, for other lazily loaded libraries (pg.c: libpq):
 * opens soname once (*loaded: 0 not yet, 1 done, -1 failed) and fills each
 * slot from a table ending in {NULL, NULL}. */
typedef struct {
  const char *name;
  void **slot;
} drv_sym;
const char *drv__dl_load(const char *soname, const drv_sym *syms, int *loaded, char *err,
                         size_t errlen);

#ifndef DROVER_LAZYLIB_IMPL
#define curl_global_init drv__curl.global_init
#define curl_global_cleanup drv__curl.global_cleanup
#define curl_easy_init drv__curl.easy_init
#define curl_easy_cleanup drv__curl.easy_cleanup
#define curl_easy_reset drv__curl.easy_reset
#undef curl_easy_setopt
#undef curl_easy_getinfo
#undef curl_multi_setopt
#define curl_easy_setopt drv__curl.easy_setopt
#define curl_easy_getinfo drv__curl.easy_getinfo
#define curl_easy_strerror drv__curl.easy_strerror
#define curl_multi_init drv__curl.multi_init
#define curl_multi_cleanup drv__curl.multi_cleanup
#define curl_multi_add_handle drv__curl.multi_add_handle
#define curl_multi_remove_handle drv__curl.multi_remove_handle
#define curl_multi_setopt drv__curl.multi_setopt
#define curl_multi_assign drv__curl.multi_assign
#define curl_multi_socket_action drv__curl.multi_socket_action
#define curl_multi_info_read drv__curl.multi_info_read
#define curl_slist_append drv__curl.slist_append
#define curl_slist_free_all drv__curl.slist_free_all
#define EVP_MD_CTX_new drv__crypto.md_ctx_new
#define EVP_MD_CTX_free drv__crypto.md_ctx_free
#define EVP_sha256 drv__crypto.sha256
#define EVP_DigestInit_ex drv__crypto.digest_init_ex
#define EVP_DigestUpdate drv__crypto.digest_update
#define EVP_DigestFinal_ex drv__crypto.digest_final_ex
#define EVP_Digest drv__crypto.digest
#endif

#endif
