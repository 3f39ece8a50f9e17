/* http.c -- placeholder until the http primitives land. */
#include "drover_int.h"

int drv__open_http(lua_State *L) {
  (void)L;
  return 0;
}
