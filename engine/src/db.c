/* db.c -- placeholder until the SQLite binding lands. */
#include "drover_int.h"

int drv__open_db(lua_State *L) {
  (void)L;
  return 0;
}
