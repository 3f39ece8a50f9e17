/* fs.c -- placeholder until the fs primitives land. */
#include "drover_int.h"

int drv__open_fs(lua_State *L) {
  (void)L;
  return 0;
}
