/* proc.c -- placeholder until the proc primitives land. */
#include "drover_int.h"

int drv__open_proc(lua_State *L) {
  (void)L;
  return 0;
}
