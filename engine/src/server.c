/* server.c -- placeholder until the HTTP server primitive lands. */
#include "drover_int.h"

int drv__open_server(lua_State *L) {
  (void)L;
  return 0;
}
