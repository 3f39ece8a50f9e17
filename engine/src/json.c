/*
 * json.c -- drover.core.json: the encoder and decoder behind drover.json.
 *
 * lua/drover/json.lua owns the interface (options, argument checks, the
 * json.array/json.object marks); this file does the byte work:
 *
 *   encode(value, kinds, indent|nil, sort_keys, null) -> text
 *       raises "drover.json.encode: PATH: what" (no position: json.lua
 *       re-raises at its caller's level).
 *   decode(text, kinds, null) -> value | nil, message
 *       never raises on malformed text.
 *   null: the sentinel for JSON null (a NULL light userdata, the same
 *       value as cjson.null, so the two libraries agree on it).
 *
 * `kinds` is json.lua's weak table (table -> "array" | "object"): encode
 * reads it to decide how a table is written, decode marks empty arrays in
 * it so that [] encodes as [] again.
 *
 * The rules (all of them inherited from the Lua implementation this
 * replaces, so its documentation in json.lua stays true):
 *   - integers exact ("%lld"); floats as the shortest of %.14g .. %.17g
 *     that reads back as the same double; NaN and infinities refused;
 *   - strings must be UTF-8 (Lua 5.4's utf8.len rules: no overlongs, no
 *     surrogates, nothing above U+10FFFF); control characters, '"', '\\'
 *     and DEL are escaped, '/' and non-ASCII are written as they are;
 *   - object keys sorted by their bytes (Lua's < on strings in the C
 *     locale) unless sort_keys is false;
 *   - tables are read with raw access (no __index, no __pairs): what is
 *     written is what the table holds.
 *
 * Memory: Lua errors longjmp out of any depth of the encoder, so every
 * malloc'd piece hangs off a userdata whose __gc frees it; on success the
 * pieces are freed at once rather than waiting for the collector.
 */
#include "drover_int.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DRV_JSON_MAXDEPTH 1000 /* containers inside containers, both ways */
#define DRV_JSON_ENC_MT "drover.json.encoder"

/* ---- shared: UTF-8 ------------------------------------------------------ */

/* Length of the valid UTF-8 sequence starting at s (s[0] >= 0x80), or 0.
 * The same acceptance as Lua 5.4's strict utf8.len. */
static size_t drv__utf8_seq(const unsigned char *s, const unsigned char *e) {
  unsigned c = s[0];
  if (c < 0xC2) return 0; /* a stray continuation byte, or an overlong 2-byte form */
  if (c < 0xE0) return (e - s >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
  if (c < 0xF0) {
    if (e - s < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && s[1] < 0xA0) return 0; /* overlong */
    if (c == 0xED && s[1] >= 0xA0) return 0; /* UTF-16 surrogates */
    return 3;
  }
  if (c < 0xF5) {
    if (e - s < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
      return 0;
    if (c == 0xF0 && s[1] < 0x90) return 0; /* overlong */
    if (c == 0xF4 && s[1] >= 0x90) return 0; /* above U+10FFFF */
    return 4;
  }
  return 0;
}

/* ---- encode: output buffer and state ------------------------------------ */

/* One object key, as collected before sorting.  Number keys keep their
 * value (to look the value up again) and their written name inline. */
typedef struct {
  const char *str; /* string key: the key itself, anchored by the table */
  size_t len;
  int type; /* LUA_TSTRING or LUA_TNUMBER */
  int isint;
  lua_Integer i;
  lua_Number d;
  size_t nlen;
  char num[32];
} drv__jkey;

/* One open container: what the path to an error is made of, and the
 * ancestors a cycle would come back to. */
typedef struct {
  const void *table;
  int is_array;
  lua_Integer index; /* array: the element being written */
  size_t cur;        /* object: the key being written (index into keys) */
  drv__jkey *keys;   /* object: its keys; reused by the next object at this depth */
  size_t cap;
} drv__jlevel;

typedef struct {
  char *buf;
  size_t len, cap;
  drv__jlevel *lv;
  int nlv;
  const char *indent; /* NULL: compact */
  size_t indentlen;
  int sort_keys;
  int kinds; /* stack index of the kinds table, 0 if none */
  int null;  /* stack index of the null sentinel */
} drv__jenc;

static void drv__jenc_free(drv__jenc *S) {
  free(S->buf);
  S->buf = NULL;
  for (int i = 0; i < S->nlv; i++) free(S->lv[i].keys);
  free(S->lv);
  S->lv = NULL;
  S->nlv = 0;
}

static int drv__jenc_gc(lua_State *L) {
  drv__jenc_free((drv__jenc *)luaL_checkudata(L, 1, DRV_JSON_ENC_MT));
  return 0;
}

static void drv__jgrow(lua_State *L, drv__jenc *S, size_t need) {
  size_t cap = S->cap ? S->cap : 1024;
  while (cap - S->len < need) {
    if (cap > SIZE_MAX / 2) luaL_error(L, "drover.json.encode: out of memory");
    cap *= 2;
  }
  char *b = realloc(S->buf, cap);
  if (!b) luaL_error(L, "drover.json.encode: out of memory");
  S->buf = b;
  S->cap = cap;
}

static inline void drv__jput(lua_State *L, drv__jenc *S, const char *s, size_t n) {
  if (S->cap - S->len < n) drv__jgrow(L, S, n);
  memcpy(S->buf + S->len, s, n);
  S->len += n;
}

static inline void drv__jputc(lua_State *L, drv__jenc *S, char c) {
  if (S->cap == S->len) drv__jgrow(L, S, 1);
  S->buf[S->len++] = c;
}

static void drv__jnewline(lua_State *L, drv__jenc *S, int depth) {
  if (!S->indent) return;
  drv__jputc(L, S, '\n');
  for (int i = 0; i < depth; i++) drv__jput(L, S, S->indent, S->indentlen);
}

/* The level record for a container at `depth`, growing the array.  The
 * array moves when it grows: never hold a pointer across a recursion. */
static drv__jlevel *drv__jlevel_at(lua_State *L, drv__jenc *S, int depth) {
  if (depth >= S->nlv) {
    int n = S->nlv ? S->nlv * 2 : 16;
    while (n <= depth) n *= 2;
    drv__jlevel *lv = realloc(S->lv, (size_t)n * sizeof *lv);
    if (!lv) luaL_error(L, "drover.json.encode: out of memory");
    memset(lv + S->nlv, 0, (size_t)(n - S->nlv) * sizeof *lv);
    S->lv = lv;
    S->nlv = n;
  }
  return &S->lv[depth];
}

/* ---- encode: numbers ---------------------------------------------------- */

/* Exact powers of ten as doubles: 10^0 .. 10^22 are all representable. */
static const double drv__jpow10[23] = {
  1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
  1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

/* Does the decimal M * 10^e read back as exactly d?  When M <= 2^53 and
 * |e| <= 22 both factors are exact doubles and one IEEE multiplication or
 * division rounds correctly, as strtod does (Clinger's fast path);
 * otherwise ask strtod about the text itself. */
static int drv__jreads_back(double d, uint64_t M, int e, const char *text) {
#if FLT_EVAL_METHOD == 0
  if (M <= (1ULL << 53) && e >= -22 && e <= 22) {
    double v = (double)M;
    v = e < 0 ? v / drv__jpow10[-e] : v * drv__jpow10[e];
    return (d < 0 ? -v : v) == d;
  }
#endif
  return strtod(text, NULL) == d;
}

/* Writes the number -?D.DDD * 10^x (digits dig[0..n), no trailing zeros)
 * as printf's %.{p}g would. */
static size_t drv__jgfmt(char *out, int neg, const char *dig, int n, int x, int p) {
  char *o = out;
  if (neg) *o++ = '-';
  if (x < -4 || x >= p) {
    *o++ = dig[0];
    if (n > 1) {
      *o++ = '.';
      memcpy(o, dig + 1, (size_t)(n - 1));
      o += n - 1;
    }
    *o++ = 'e';
    *o++ = x < 0 ? '-' : '+';
    int ax = x < 0 ? -x : x;
    if (ax >= 100) *o++ = (char)('0' + ax / 100);
    *o++ = (char)('0' + ax / 10 % 10);
    *o++ = (char)('0' + ax % 10);
  } else if (x >= 0) {
    for (int i = 0; i <= x; i++) *o++ = i < n ? dig[i] : '0';
    if (n > x + 1) {
      *o++ = '.';
      memcpy(o, dig + x + 1, (size_t)(n - x - 1));
      o += n - x - 1;
    }
  } else {
    *o++ = '0';
    *o++ = '.';
    for (int i = 0; i < -x - 1; i++) *o++ = '0';
    memcpy(o, dig, (size_t)n);
    o += n;
  }
  *o = '\0';
  return (size_t)(o - out);
}

#if defined(__SIZEOF_INT128__) && FLT_EVAL_METHOD == 0
#define DRV_JSON_FAST_FLOAT 1
__extension__ typedef unsigned __int128 drv__u128;

static drv__u128 drv__jpow10_128(int k) {
  drv__u128 p = 1;
  while (k-- > 0) p *= 10;
  return p;
}

/* Is m / 2^S >= 10^x? */
static int drv__jge_pow10(uint64_t m, int S, int x) {
  if (x >= 0) return (drv__u128)m >= drv__jpow10_128(x) << S;
  return (drv__u128)m * drv__jpow10_128(-x) >= (drv__u128)1 << S;
}

/* The nearest p-digit decimals of d, for p = 14, 15, 16, decided exactly
 * with 128-bit integers, without printf: d = m * 2^E (m an integer), so
 * d * 10^k lies above or below the midpoint M + 1/2 as 2 m 10^k does
 * against (2M + 1) 2^-E.  Writes the shortest that reads back and returns
 * its length; returns 0 when none of the three does (then it is %.17g),
 * and -1 when d is outside the range this handles (then printf decides).
 * Exact ties go to the even neighbour, as printf rounds them. */
static int drv__jfloat_fast(double d, char *out) {
  double a = d < 0 ? -d : d;
  if (!(a >= 1e-5 && a < 1e13)) return -1;
  int E;
  double fr = frexp(a, &E);                 /* a = fr * 2^E, fr in [0.5, 1) */
  uint64_t m = (uint64_t)ldexp(fr, 53);     /* exact: 53 bits */
  int S = 53 - E;                           /* a = m / 2^S, S in [9, 69] */
  /* the decimal exponent: log10 may be off by one next to a power of ten */
  int x = (int)floor(log10(a));
  while (x > -6 && !drv__jge_pow10(m, S, x)) x--;
  while (x < 12 && drv__jge_pow10(m, S, x + 1)) x++;
  for (int p = 14; p <= 16; p++) {
    int k = p - 1 - x; /* in [1, 20]: 10^k is an exact double */
    uint64_t M = (uint64_t)(a * drv__jpow10[k] + 0.5); /* within a unit or so */
    drv__u128 T2 = (drv__u128)m * drv__jpow10_128(k) * 2; /* 2 a 10^k, times 2^S */
    for (;;) { /* walk M to the nearest */
      drv__u128 up = ((drv__u128)(2 * M + 1)) << S;
      drv__u128 lo = ((drv__u128)(2 * M - 1)) << S;
      if (T2 > up || (T2 == up && (M & 1))) M++;
      else if (T2 < lo || (T2 == lo && (M & 1))) M--;
      else break;
    }
    /* M * 10^-k, p digits (10^p after a carry) */
    int e = -k;
    while (M % 10 == 0) {
      M /= 10;
      e++;
    }
    if (M > (1ULL << 53)) return -1;        /* beyond Clinger's path: printf decides */
    double v = (double)M;
    v = e < 0 ? v / drv__jpow10[-e] : v * drv__jpow10[e];
    if (v != a) continue;
    char dig[20];
    int n = 0;
    for (uint64_t t = M; t; t /= 10) dig[n++] = (char)('0' + t % 10);
    for (int i = 0; i < n / 2; i++) {
      char c = dig[i];
      dig[i] = dig[n - 1 - i];
      dig[n - 1 - i] = c;
    }
    return (int)drv__jgfmt(out, d < 0, dig, n, e + n - 1, p);
  }
  return 0;
}
#endif /* fast float */

/* The shortest of %.14g .. %.17g that reads back as d (finite): %.14g
 * keeps 0.1 as "0.1", %.17g is always exact.  printf is exact but slow
 * (multi-precision arithmetic), so it runs once, for 17 significant
 * digits, and the 14..16 digit roundings are made from those digits.
 * That is exact: rounding to 17 digits never moves a value across the
 * half-way point of a shorter rounding, unless the digits dropped are
 * exactly 5, 50 or 500 -- then printf is asked again for that length. */
static size_t drv__jfloat(double d, char *out) {
  if (d == 0) return (size_t)snprintf(out, 32, "%.14g", d); /* "0" or "-0" */
#ifdef DRV_JSON_FAST_FLOAT
  int r = drv__jfloat_fast(d, out);
  if (r > 0) return (size_t)r;
  if (r == 0) return (size_t)snprintf(out, 32, "%.17g", d);
#endif
  int neg = d < 0;
  double a = neg ? -d : d;
  char e17[40], d17[17];
  snprintf(e17, sizeof e17, "%.16e", a); /* D.DDDDDDDDDDDDDDDDe+XX */
  d17[0] = e17[0];
  memcpy(d17 + 1, e17 + 2, 16);
  int x17 = atoi(e17 + 19);
  size_t len = 0;
  for (int p = 14; p <= 17; p++) {
    char dig[17];
    int x = x17, n = p;
    const char *tail = d17 + p; /* the 17 - p digits dropped */
    int half = p < 17 && tail[0] == '5';
    for (int i = 1; half && i < 17 - p; i++) half = tail[i] == '0';
    if (half) { /* a tie at 17 digits need not be one in the exact value */
      char again[40];
      snprintf(again, sizeof again, "%.*e", p - 1, a);
      dig[0] = again[0];
      memcpy(dig + 1, again + 2, (size_t)(p - 1));
      x = atoi(again + p + 2);
    } else {
      memcpy(dig, d17, (size_t)p);
      if (p < 17 && tail[0] >= '5') { /* round up, carrying */
        int i = p - 1;
        while (i >= 0 && dig[i] == '9') dig[i--] = '0';
        if (i >= 0) {
          dig[i]++;
        } else { /* 9.99..9 became 10.00..0 */
          dig[0] = '1';
          x++;
        }
      }
    }
    while (n > 1 && dig[n - 1] == '0') n--;
    uint64_t M = 0;
    for (int i = 0; i < n; i++) M = M * 10 + (uint64_t)(dig[i] - '0');
    len = drv__jgfmt(out, neg, dig, n, x, p);
    if (p == 17 || drv__jreads_back(d, M, x - (n - 1), out)) break;
  }
  return len;
}

/* Writes the number at idx into out (32 bytes); returns its length, or 0
 * for NaN and the infinities. */
static size_t drv__jnumber(lua_State *L, int idx, char *out) {
  if (lua_isinteger(L, idx)) {
    lua_Integer i = lua_tointeger(L, idx);
    /* unsigned arithmetic: the negation of LUA_MININTEGER overflows */
    unsigned long long u = i < 0 ? 0ULL - (unsigned long long)i : (unsigned long long)i;
    char tmp[24];
    size_t n = 0, k = 0;
    do {
      tmp[n++] = (char)('0' + u % 10);
      u /= 10;
    } while (u);
    if (i < 0) out[k++] = '-';
    while (n) out[k++] = tmp[--n];
    return k;
  }
  lua_Number d = lua_tonumber(L, idx);
  if (isnan(d) || isinf(d)) return 0;
  return drv__jfloat(d, out);
}

/* ---- encode: errors ----------------------------------------------------- */

/* Pushes s quoted like string.format("%q", s). */
static void drv__jpushq(lua_State *L, const char *s, size_t len) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, '"');
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\' || c == '\n') {
      luaL_addchar(&b, '\\');
      luaL_addchar(&b, (char)c);
    } else if (c < 32 || c == 127) {
      char esc[8];
      unsigned char next = i + 1 < len ? (unsigned char)s[i + 1] : 0;
      snprintf(esc, sizeof esc, (next >= '0' && next <= '9') ? "\\%03d" : "\\%d", c);
      luaL_addstring(&b, esc);
    } else {
      luaL_addchar(&b, (char)c);
    }
  }
  luaL_addchar(&b, '"');
  luaL_pushresult(&b);
}

/* Pushes a key as the Lua encoder's key_string did: %q for strings,
 * tostring() for anything else. */
static void drv__jpushkey(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TSTRING) {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    drv__jpushq(L, s, len);
  } else {
    luaL_tolstring(L, idx, NULL);
  }
}

static int drv__jident(const char *s, size_t len) {
  if (len == 0) return 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return 0;
  }
  return 1;
}

/* Pushes "value.steps[2].run": the path to the value inside `depth`
 * open containers. */
static void drv__jpushpath(lua_State *L, drv__jenc *S, int depth) {
  luaL_checkstack(L, 4, NULL);
  lua_pushliteral(L, "value");
  for (int d = 0; d < depth; d++) {
    drv__jlevel *lv = &S->lv[d];
    if (lv->is_array) {
      lua_pushfstring(L, "[%I]", (LUAI_UACINT)lv->index);
    } else {
      drv__jkey *k = &lv->keys[lv->cur];
      if (k->type == LUA_TSTRING) {
        if (drv__jident(k->str, k->len)) {
          lua_pushliteral(L, ".");
          lua_pushlstring(L, k->str, k->len);
          lua_concat(L, 2);
        } else {
          lua_pushliteral(L, "[");
          drv__jpushq(L, k->str, k->len);
          lua_pushliteral(L, "]");
          lua_concat(L, 3);
        }
      } else {
        lua_pushliteral(L, "[");
        if (k->isint) lua_pushinteger(L, k->i);
        else lua_pushnumber(L, k->d);
        luaL_tolstring(L, -1, NULL); /* tostring(): 1.5, 1e+300, 2^63 as float */
        lua_remove(L, -2);
        lua_pushliteral(L, "]");
        lua_concat(L, 3);
      }
    }
    lua_concat(L, 2);
  }
}

/* Raises "drover.json.encode: PATH: what", with `what` at the top. */
static int drv__jfailv(lua_State *L, drv__jenc *S, int depth) {
  lua_pushliteral(L, "drover.json.encode: ");
  drv__jpushpath(L, S, depth);
  lua_pushliteral(L, ": ");
  lua_rotate(L, -4, -1); /* what, prefix, path, sep -> prefix, path, sep, what */
  lua_concat(L, 4);
  return lua_error(L);
}

static int drv__jfail(lua_State *L, drv__jenc *S, int depth, const char *what) {
  lua_pushstring(L, what);
  return drv__jfailv(L, S, depth);
}

/* ---- encode: strings ---------------------------------------------------- */

/* 0: written as is; 'u': \u00XX; otherwise the letter after the backslash */
static const char drv__jesc[128] = {
  'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'b', 't', 'n', 'u', 'f', 'r', 'u', 'u',
  'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u', 'u',
  0, 0, '"', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '\\', 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 'u',
};

static const char drv__jhex[16] = "0123456789abcdef";

/* Writes s quoted; raises (naming the path) when s is not UTF-8. */
static void drv__jstring(lua_State *L, drv__jenc *S, const char *str, size_t len, int depth) {
  const unsigned char *s = (const unsigned char *)str, *e = s + len;
  drv__jputc(L, S, '"');
  while (s < e) {
    /* room for the worst case of a chunk (every byte \u00XX, and a UTF-8
     * sequence running 3 bytes past its end) reserved once: no check per
     * byte, and no 6x reservation for one huge string */
    size_t chunk = (size_t)(e - s) < 4096 ? (size_t)(e - s) : 4096;
    if (S->cap - S->len < 6 * chunk + 8) drv__jgrow(L, S, 6 * chunk + 8);
    const unsigned char *ce = s + chunk;
    char *o = S->buf + S->len;
    while (s < ce) {
      unsigned c = *s;
      if (c < 0x80) {
        char x = drv__jesc[c];
        if (!x) {
          *o++ = (char)c;
        } else if (x == 'u') {
          memcpy(o, "\\u00", 4);
          o[4] = drv__jhex[c >> 4];
          o[5] = drv__jhex[c & 15];
          o += 6;
        } else {
          o[0] = '\\';
          o[1] = x;
          o += 2;
        }
        s++;
      } else {
        size_t n = drv__utf8_seq(s, e);
        if (!n) {
          S->len = (size_t)(o - S->buf);
          drv__jfail(L, S, depth, "invalid UTF-8 in string");
        }
        memcpy(o, s, n);
        o += n;
        s += n;
      }
    }
    S->len = (size_t)(o - S->buf);
  }
  drv__jputc(L, S, '"');
}

/* ---- encode: tables ----------------------------------------------------- */

static void drv__jvalue(lua_State *L, drv__jenc *S, int idx, int depth);

static const char *drv__jkeyname(const drv__jkey *k, size_t *len) {
  if (k->type == LUA_TSTRING) {
    *len = k->len;
    return k->str;
  }
  *len = k->nlen;
  return k->num;
}

/* Byte order, shorter first on a common prefix: Lua's < on strings. */
static int drv__jkeycmp(const void *a, const void *b) {
  size_t la, lb;
  const char *sa = drv__jkeyname(a, &la), *sb = drv__jkeyname(b, &lb);
  int c = memcmp(sa, sb, la < lb ? la : lb);
  if (c) return c;
  return la < lb ? -1 : la > lb;
}

/* Insertion sort for the few keys most objects have (qsort's set-up costs
 * more than the sort there), qsort beyond. */
static void drv__jsortkeys(drv__jkey *keys, size_t n) {
  if (n > 16) {
    qsort(keys, n, sizeof *keys, drv__jkeycmp);
    return;
  }
  for (size_t i = 1; i < n; i++) {
    if (drv__jkeycmp(&keys[i - 1], &keys[i]) <= 0) continue;
    drv__jkey k = keys[i];
    size_t j = i;
    while (j > 0 && drv__jkeycmp(&keys[j - 1], &k) > 0) {
      keys[j] = keys[j - 1];
      j--;
    }
    keys[j] = k;
  }
}

/* The key of t (at idx) that fails `pred`, pushed; the first in next()
 * order, as the Lua encoder reported it. */
static void drv__jpush_badkey(lua_State *L, int idx, int allow_strings) {
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    int ok = (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1) ||
             (allow_strings && lua_type(L, -1) == LUA_TSTRING);
    if (!ok) return;
  }
  lua_pushnil(L); /* cannot happen: the caller counted one */
}

static void drv__jarray(lua_State *L, drv__jenc *S, int idx, int depth, lua_Integer maxn) {
  if (maxn == 0) {
    drv__jput(L, S, "[]", 2);
    return;
  }
  drv__jputc(L, S, '[');
  for (lua_Integer i = 1; i <= maxn; i++) {
    if (i > 1) drv__jputc(L, S, ',');
    drv__jnewline(L, S, depth + 1);
    S->lv[depth].index = i;
    lua_rawgeti(L, idx, i);
    drv__jvalue(L, S, lua_gettop(L), depth + 1);
    lua_pop(L, 1);
  }
  drv__jnewline(L, S, depth);
  drv__jputc(L, S, ']');
}

static void drv__jobject(lua_State *L, drv__jenc *S, int idx, int depth, lua_Integer count,
                         int check_dups) {
  if (count == 0) {
    drv__jput(L, S, "{}", 2);
    return;
  }
  drv__jlevel *lv = &S->lv[depth];
  if ((size_t)count > lv->cap) {
    drv__jkey *keys = realloc(lv->keys, (size_t)count * sizeof *keys);
    if (!keys) luaL_error(L, "drover.json.encode: out of memory");
    lv->keys = keys;
    lv->cap = (size_t)count;
  }
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    drv__jkey *k = &lv->keys[n];
    int kt = lua_type(L, -1);
    k->type = kt;
    if (kt == LUA_TSTRING) {
      k->str = lua_tolstring(L, -1, &k->len); /* a string key: no conversion */
    } else if (kt == LUA_TNUMBER) {
      k->isint = lua_isinteger(L, -1);
      if (k->isint) k->i = lua_tointeger(L, -1);
      else k->d = lua_tonumber(L, -1);
      k->nlen = drv__jnumber(L, -1, k->num);
      if (!k->nlen) {
        lua_pop(L, 1);
        drv__jfail(L, S, depth, "cannot use NaN or infinity as an object key");
      }
    } else {
      lua_pushfstring(L, "object key of type %s", luaL_typename(L, -1));
      drv__jfailv(L, S, depth);
    }
    n++;
  }
  if (S->sort_keys || check_dups) drv__jsortkeys(lv->keys, n);
  if (check_dups) { /* numbers written as strings may collide with strings */
    for (size_t i = 1; i < n; i++) {
      if (drv__jkeycmp(&lv->keys[i - 1], &lv->keys[i]) == 0) {
        size_t len;
        const char *name = drv__jkeyname(&lv->keys[i], &len);
        lua_pushliteral(L, "duplicate object key ");
        drv__jpushq(L, name, len);
        lua_concat(L, 2);
        drv__jfailv(L, S, depth);
      }
    }
  }
  const char *colon = S->indent ? ": " : ":";
  size_t colonlen = S->indent ? 2 : 1;
  drv__jputc(L, S, '{');
  for (size_t i = 0; i < n; i++) {
    if (i > 0) drv__jputc(L, S, ',');
    drv__jnewline(L, S, depth + 1);
    lv = &S->lv[depth]; /* deeper levels may have moved the array */
    lv->cur = i;
    drv__jkey *k = &lv->keys[i];
    size_t len;
    const char *name = drv__jkeyname(k, &len);
    drv__jstring(L, S, name, len, depth + 1);
    drv__jput(L, S, colon, colonlen);
    if (k->type == LUA_TSTRING) lua_pushlstring(L, k->str, k->len);
    else if (k->isint) lua_pushinteger(L, k->i);
    else lua_pushnumber(L, k->d);
    lua_rawget(L, idx);
    drv__jvalue(L, S, lua_gettop(L), depth + 1);
    lua_pop(L, 1);
  }
  drv__jnewline(L, S, depth);
  drv__jputc(L, S, '}');
}

static void drv__jtable(lua_State *L, drv__jenc *S, int idx, int depth) {
  const void *p = lua_topointer(L, idx);
  for (int d = 0; d < depth; d++)
    if (S->lv[d].table == p) drv__jfail(L, S, depth, "cycle (a table that contains itself)");
  if (depth >= DRV_JSON_MAXDEPTH) drv__jfail(L, S, depth, "nesting deeper than 1000 levels");
  luaL_checkstack(L, 8, "drover.json.encode");

  /* the same census as the Lua encoder: it decides plain tables' kind */
  lua_Integer count = 0, maxn = 0, strs = 0, others = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    count++;
    if (lua_isinteger(L, -1)) {
      lua_Integer k = lua_tointeger(L, -1);
      if (k >= 1) {
        if (k > maxn) maxn = k;
      } else {
        others++;
      }
    } else if (lua_type(L, -1) == LUA_TSTRING) {
      strs++;
    } else {
      others++;
    }
  }
  lua_Integer ints = count - strs - others;

  int is_array;
  const char *kind = NULL;
  if (S->kinds) {
    lua_pushvalue(L, idx);
    lua_rawget(L, S->kinds);
    kind = lua_tostring(L, -1); /* the table keeps the string alive */
    lua_pop(L, 1);
  }
  if (kind) {
    is_array = strcmp(kind, "array") == 0;
  } else if (count == 0) {
    is_array = 0;
  } else if (strs == 0 && others == 0) {
    is_array = 1;
  } else if (ints == 0 && others == 0) {
    is_array = 0;
  } else if (others > 0) {
    drv__jpush_badkey(L, idx, 1);
    lua_pushliteral(L, "table key ");
    drv__jpushkey(L, -2);
    lua_pushliteral(L, " is neither a string nor a positive integer; "
                       "use json.object to write number keys as strings");
    lua_concat(L, 3);
    drv__jfailv(L, S, depth);
    return;
  } else {
    drv__jfail(L, S, depth, "table with both string and integer keys; use json.object "
                            "(integer keys become strings) or json.array");
    return;
  }

  drv__jlevel *lv = drv__jlevel_at(L, S, depth);
  lv->table = p;
  lv->is_array = is_array;
  if (is_array) {
    if (strs > 0 || others > 0) {
      drv__jpush_badkey(L, idx, 0);
      lua_pushliteral(L, "array with a non-index key ");
      drv__jpushkey(L, -2);
      lua_concat(L, 2);
      drv__jfailv(L, S, depth);
    }
    if (maxn > 10 && maxn > 2 * count) {
      lua_pushfstring(L, "excessively sparse array (%I elements, largest index %I); use json.object",
                      (LUAI_UACINT)count, (LUAI_UACINT)maxn);
      drv__jfailv(L, S, depth);
    }
    drv__jarray(L, S, idx, depth, maxn);
  } else {
    drv__jobject(L, S, idx, depth, count, strs > 0 && count > strs);
  }
  S->lv[depth].table = NULL;
}

static void drv__jvalue(lua_State *L, drv__jenc *S, int idx, int depth) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    drv__jstring(L, S, s, len, depth);
    return;
  }
  case LUA_TNUMBER: {
    char num[32];
    size_t n = drv__jnumber(L, idx, num);
    if (!n) drv__jfail(L, S, depth, "cannot encode NaN or infinity");
    drv__jput(L, S, num, n);
    return;
  }
  case LUA_TBOOLEAN:
    if (lua_toboolean(L, idx)) drv__jput(L, S, "true", 4);
    else drv__jput(L, S, "false", 5);
    return;
  case LUA_TNIL:
    drv__jput(L, S, "null", 4);
    return;
  case LUA_TTABLE:
    drv__jtable(L, S, idx, depth);
    return;
  default:
    if (lua_rawequal(L, idx, S->null)) {
      drv__jput(L, S, "null", 4);
      return;
    }
    lua_pushfstring(L, "cannot encode %s", luaL_typename(L, idx));
    drv__jfailv(L, S, depth);
  }
}

/* encode(value, kinds, indent|nil, sort_keys, null) -> text */
static int drv__l_json_encode(lua_State *L) {
  lua_settop(L, 5);
  drv__jenc *S = lua_newuserdatauv(L, sizeof *S, 0);
  memset(S, 0, sizeof *S);
  luaL_setmetatable(L, DRV_JSON_ENC_MT);
  if (lua_istable(L, 2)) S->kinds = 2;
  if (lua_type(L, 3) == LUA_TSTRING) {
    S->indent = lua_tolstring(L, 3, &S->indentlen);
    if (S->indentlen == 0) S->indent = NULL;
  }
  S->sort_keys = lua_toboolean(L, 4);
  S->null = 5;
  drv__jvalue(L, S, 1, 0);
  lua_pushlstring(L, S->buf ? S->buf : "", S->len);
  drv__jenc_free(S);
  return 1;
}

/* ---- decode ------------------------------------------------------------- */

typedef struct {
  const char *s, *p, *e; /* the text, the cursor, the end */
  int kinds, null;       /* stack indexes; kinds 0 when absent */
  int depth;
  const char *err; /* the failure: "Expected X but found Y" or a token error */
  const char *expected;
  size_t errpos; /* 0-based byte offset */
  int standalone; /* err is the whole message: no "Expected X but found" around it */
} drv__jdec;

/* Bytes that may continue a number token: digits, letters, '.', '+', '-'.
 * The token is taken whole and then checked, so "0x10" is one invalid
 * number rather than 0 followed by garbage. */
static const unsigned char drv__jnumchar[256] = {
  ['+'] = 1, ['-'] = 1, ['.'] = 1,
  ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
  ['8'] = 1, ['9'] = 1,
  ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
  ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
  ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
  ['Y'] = 1, ['Z'] = 1,
  ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
  ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
  ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
  ['y'] = 1, ['z'] = 1,
};

static void drv__jd_ws(drv__jdec *D) {
  while (D->p < D->e && (*D->p == ' ' || *D->p == '\n' || *D->p == '\r' || *D->p == '\t')) D->p++;
}

static int drv__jd_error(drv__jdec *D, const char *at, const char *err) {
  if (!D->err) {
    D->err = err;
    D->errpos = (size_t)(at - D->s);
  }
  return 0;
}

/* End of the number token at p, and whether it is valid JSON; *isint when
 * it has neither fraction nor exponent. */
static const char *drv__jd_numtoken(const char *p, const char *e, int *valid, int *isint) {
  const char *r = p;
  while (r < e && drv__jnumchar[(unsigned char)*r]) r++;
  const char *q = p;
  *valid = 0;
  *isint = 1;
  if (q < r && *q == '-') q++;
  if (q == r) return r;
  if (*q == '0') q++;
  else if (*q >= '1' && *q <= '9')
    while (q < r && *q >= '0' && *q <= '9') q++;
  else return r;
  if (q < r && *q == '.') {
    *isint = 0;
    q++;
    if (q == r || !(*q >= '0' && *q <= '9')) return r;
    while (q < r && *q >= '0' && *q <= '9') q++;
  }
  if (q < r && (*q == 'e' || *q == 'E')) {
    *isint = 0;
    q++;
    if (q < r && (*q == '+' || *q == '-')) q++;
    if (q == r || !(*q >= '0' && *q <= '9')) return r;
    while (q < r && *q >= '0' && *q <= '9') q++;
  }
  *valid = q == r;
  return r;
}

/* What the token at p is, for "but found ..." (cjson's words). */
static const char *drv__jd_found(drv__jdec *D, const char *p) {
  if (p >= D->e) return "the end of the text";
  size_t left = (size_t)(D->e - p);
  switch (*p) {
  case '[': return "'['";
  case ']': return "']'";
  case '{': return "'{'";
  case '}': return "'}'";
  case ':': return "':'";
  case ',': return "','";
  case '"': return "a string";
  case 't': return left >= 4 && memcmp(p, "true", 4) == 0 ? "a boolean" : "invalid token";
  case 'f': return left >= 5 && memcmp(p, "false", 5) == 0 ? "a boolean" : "invalid token";
  case 'n': return left >= 4 && memcmp(p, "null", 4) == 0 ? "null" : "invalid token";
  default:
    if (*p == '-' || (*p >= '0' && *p <= '9')) {
      int valid, isint;
      drv__jd_numtoken(p, D->e, &valid, &isint);
      return valid ? "a number" : "invalid number";
    }
    return "invalid token";
  }
}

static int drv__jd_expected(drv__jdec *D, const char *what) {
  if (!D->err) D->expected = what;
  return drv__jd_error(D, D->p, drv__jd_found(D, D->p));
}

static int drv__jd_hex4(const char *p, const char *e, unsigned *out) {
  if (e - p < 4) return 0;
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    char c = p[i];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
    else return 0;
  }
  *out = v;
  return 1;
}

/* Pushes the string at D->p (on its opening quote).  The text was checked
 * to be UTF-8 beforehand, so bytes are copied as they are; raw control
 * characters are accepted, as cjson did. */
static int drv__jd_string(lua_State *L, drv__jdec *D) {
  const char *p = D->p + 1, *e = D->e;
  const char *q = memchr(p, '"', (size_t)(e - p));
  const char *bs = memchr(p, '\\', (size_t)((q ? q : e) - p));
  if (!bs) {
    if (!q) return drv__jd_error(D, e, "unexpected end of string");
    lua_pushlstring(L, p, (size_t)(q - p));
    D->p = q + 1;
    return 1;
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (;;) {
    const char *run = p;
    while (p < e && *p != '"' && *p != '\\') p++;
    luaL_addlstring(&b, run, (size_t)(p - run));
    if (p >= e) return drv__jd_error(D, p, "unexpected end of string");
    if (*p == '"') break;
    const char *esc = p++;
    if (p >= e) return drv__jd_error(D, p, "unexpected end of string");
    char c = *p++;
    switch (c) {
    case '"': luaL_addchar(&b, '"'); break;
    case '\\': luaL_addchar(&b, '\\'); break;
    case '/': luaL_addchar(&b, '/'); break;
    case 'b': luaL_addchar(&b, '\b'); break;
    case 'f': luaL_addchar(&b, '\f'); break;
    case 'n': luaL_addchar(&b, '\n'); break;
    case 'r': luaL_addchar(&b, '\r'); break;
    case 't': luaL_addchar(&b, '\t'); break;
    case 'u': {
      unsigned cp, lo;
      if (!drv__jd_hex4(p, e, &cp)) return drv__jd_error(D, esc, "invalid unicode escape code");
      p += 4;
      if (cp >= 0xDC00 && cp <= 0xDFFF) return drv__jd_error(D, esc, "invalid unicode escape code");
      if (cp >= 0xD800 && cp <= 0xDBFF) { /* needs its low half next */
        if (e - p < 6 || p[0] != '\\' || p[1] != 'u' || !drv__jd_hex4(p + 2, e, &lo) ||
            lo < 0xDC00 || lo > 0xDFFF)
          return drv__jd_error(D, esc, "invalid unicode escape code");
        p += 6;
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
      }
      char u[4];
      size_t n;
      if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
      } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
      } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
      } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
      }
      luaL_addlstring(&b, u, n);
      break;
    }
    default:
      return drv__jd_error(D, esc, "invalid escape code");
    }
  }
  luaL_pushresult(&b);
  D->p = p + 1;
  return 1;
}

/* Integers exact across int64; anything else through strtod (a number
 * beyond the range of a double is refused, not read as an infinity), and an
 * integral float that fits becomes an integer (math.tointeger's rule, as
 * the old decoder's fix-up walk did). */
static int drv__jd_number(lua_State *L, drv__jdec *D) {
  const char *p = D->p;
  int valid, isint;
  const char *r = drv__jd_numtoken(p, D->e, &valid, &isint);
  if (!valid) return drv__jd_error(D, p, "invalid number");
  D->p = r;
  if (isint) {
    int neg = *p == '-';
    const char *q = p + neg;
    unsigned long long v = 0, limit = neg ? (1ULL << 63) : (1ULL << 63) - 1;
    int fits = 1;
    for (; q < r; q++) {
      unsigned d = (unsigned)(*q - '0');
      if (v > (limit - d) / 10) {
        fits = 0;
        break;
      }
      v = v * 10 + d;
    }
    /* unsigned negation: -2^63 has no positive counterpart */
    if (fits) {
      lua_pushinteger(L, neg ? (lua_Integer)(0ULL - v) : (lua_Integer)v);
      return 1;
    }
  }
  /* the token ends at a byte strtod cannot take, so it reads exactly it */
  double d = strtod(p, NULL);
  if (isinf(d)) { /* encode refuses infinities: so does decode, rather than change the value */
    D->standalone = 1;
    return drv__jd_error(D, p, "number out of range");
  }
  /* An integer token beyond int64 stays a float, even if it rounds into
   * range.  So does a float that rounds to -2^63: the range is open at
   * both ends, so that text re-encoding a decoded float (the shortest
   * digits that read back, "-9.223372036854776e+18") decodes to a float
   * again instead of becoming the integer -2^63. */
  if (!isint && d > -9223372036854775808.0 && d < 9223372036854775808.0 && d == floor(d))
    lua_pushinteger(L, (lua_Integer)d);
  else
    lua_pushnumber(L, d);
  return 1;
}

static int drv__jd_value(lua_State *L, drv__jdec *D);

static int drv__jd_descend(lua_State *L, drv__jdec *D) {
  if (++D->depth > DRV_JSON_MAXDEPTH || !lua_checkstack(L, 6))
    return drv__jd_error(D, D->p, "too many nested data structures");
  return 1;
}

static int drv__jd_array(lua_State *L, drv__jdec *D) {
  if (!drv__jd_descend(L, D)) return 0;
  D->p++;
  lua_newtable(L);
  drv__jd_ws(D);
  if (D->p < D->e && *D->p == ']') {
    D->p++;
    if (D->kinds) { /* so that [] encodes as [] again */
      lua_pushvalue(L, -1);
      lua_pushliteral(L, "array");
      lua_rawset(L, D->kinds);
    }
    D->depth--;
    return 1;
  }
  for (lua_Integer i = 1;; i++) {
    if (!drv__jd_value(L, D)) return 0;
    lua_rawseti(L, -2, i);
    drv__jd_ws(D);
    if (D->p < D->e && *D->p == ',') {
      D->p++;
    } else if (D->p < D->e && *D->p == ']') {
      D->p++;
      break;
    } else {
      return drv__jd_expected(D, "comma or array end");
    }
  }
  D->depth--;
  return 1;
}

static int drv__jd_object(lua_State *L, drv__jdec *D) {
  if (!drv__jd_descend(L, D)) return 0;
  D->p++;
  lua_newtable(L);
  drv__jd_ws(D);
  if (D->p < D->e && *D->p == '}') {
    D->p++;
    D->depth--;
    return 1;
  }
  for (;;) {
    drv__jd_ws(D);
    if (D->p >= D->e || *D->p != '"') return drv__jd_expected(D, "object key string");
    if (!drv__jd_string(L, D)) {
      D->expected = "object key string";
      return 0;
    }
    drv__jd_ws(D);
    if (D->p >= D->e || *D->p != ':') return drv__jd_expected(D, "colon");
    D->p++;
    if (!drv__jd_value(L, D)) return 0;
    lua_rawset(L, -3);
    drv__jd_ws(D);
    if (D->p < D->e && *D->p == ',') {
      D->p++;
    } else if (D->p < D->e && *D->p == '}') {
      D->p++;
      break;
    } else {
      return drv__jd_expected(D, "comma or object end");
    }
  }
  D->depth--;
  return 1;
}

static int drv__jd_literal(lua_State *L, drv__jdec *D, const char *word, size_t n) {
  if ((size_t)(D->e - D->p) < n || memcmp(D->p, word, n) != 0)
    return drv__jd_expected(D, "value");
  D->p += n;
  return 1;
}

static int drv__jd_value(lua_State *L, drv__jdec *D) {
  drv__jd_ws(D);
  if (D->p >= D->e) return drv__jd_expected(D, "value");
  switch (*D->p) {
  case '{': return drv__jd_object(L, D);
  case '[': return drv__jd_array(L, D);
  case '"':
    if (!drv__jd_string(L, D)) {
      D->expected = "value";
      return 0;
    }
    return 1;
  case 't':
    if (!drv__jd_literal(L, D, "true", 4)) return 0;
    lua_pushboolean(L, 1);
    return 1;
  case 'f':
    if (!drv__jd_literal(L, D, "false", 5)) return 0;
    lua_pushboolean(L, 0);
    return 1;
  case 'n':
    if (!drv__jd_literal(L, D, "null", 4)) return 0;
    lua_pushvalue(L, D->null);
    return 1;
  default:
    if (*D->p == '-' || (*D->p >= '0' && *D->p <= '9')) {
      if (!drv__jd_number(L, D)) {
        if (!D->standalone) D->expected = "value";
        return 0;
      }
      return 1;
    }
    return drv__jd_expected(D, "value");
  }
}

/* Position of the first byte that is not UTF-8, or 0 (1-based). */
static size_t drv__jd_check_utf8(const char *text, size_t len) {
  const unsigned char *s = (const unsigned char *)text, *e = s + len;
  while (s < e) {
    /* ASCII runs, 8 bytes at a time */
    while (e - s >= 8) {
      uint64_t w;
      memcpy(&w, s, 8);
      if (w & 0x8080808080808080ULL) break;
      s += 8;
    }
    if (s >= e) break;
    if (*s < 0x80) {
      s++;
      continue;
    }
    size_t n = drv__utf8_seq(s, e);
    if (!n) return (size_t)(s - (const unsigned char *)text) + 1;
    s += n;
  }
  return 0;
}

/* decode(text, kinds, null) -> value | nil, message */
static int drv__l_json_decode(lua_State *L) {
  size_t len;
  const char *text = luaL_checklstring(L, 1, &len);
  lua_settop(L, 3);
  size_t bad = drv__jd_check_utf8(text, len);
  if (bad) {
    lua_pushnil(L);
    lua_pushfstring(L, "drover.json.decode: invalid UTF-8 at byte %I", (LUAI_UACINT)bad);
    return 2;
  }
  drv__jdec D = {.s = text, .p = text, .e = text + len, .null = 3};
  if (lua_istable(L, 2)) D.kinds = 2;
  if (drv__jd_value(L, &D)) {
    drv__jd_ws(&D);
    if (D.p >= D.e) return 1;
    D.expected = "the end";
    drv__jd_error(&D, D.p, drv__jd_found(&D, D.p));
  }
  lua_settop(L, 3);
  /* line and column too: byte offsets are hard to find in multi-line text */
  size_t line = 1, col = D.errpos + 1;
  for (size_t i = 0; i < D.errpos && i < len; i++) {
    if (text[i] == '\n') {
      line++;
      col = D.errpos - i;
    }
  }
  lua_pushnil(L);
  if (D.standalone) {
    lua_pushfstring(L, "drover.json.decode: %s at byte %I (line %I, column %I)", D.err,
                    (LUAI_UACINT)(D.errpos + 1), (LUAI_UACINT)line, (LUAI_UACINT)col);
  } else if (D.expected) {
    lua_pushfstring(L, "drover.json.decode: Expected %s but found %s at character %I (line %I, column %I)",
                    D.expected, D.err, (LUAI_UACINT)(D.errpos + 1), (LUAI_UACINT)line,
                    (LUAI_UACINT)col);
  } else {
    lua_pushfstring(L, "drover.json.decode: Found %s at character %I (line %I, column %I)", D.err,
                    (LUAI_UACINT)(D.errpos + 1), (LUAI_UACINT)line, (LUAI_UACINT)col);
  }
  return 2;
}

int drv__open_json(lua_State *L) {
  if (luaL_newmetatable(L, DRV_JSON_ENC_MT)) {
    lua_pushcfunction(L, drv__jenc_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, drv__l_json_encode);
  lua_setfield(L, -2, "encode");
  lua_pushcfunction(L, drv__l_json_decode);
  lua_setfield(L, -2, "decode");
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
  return 0;
}
