/*
 * main.c -- a C program that embeds drover (docs/embedding.md).
 *
 *   cc -o embed main.c $(pkg-config --cflags --libs drover)
 *   ./embed [DIR]        DIR holds workflow.lua and hello_job.lua (default .)
 *
 * It registers a C function that Lua calls as drover.host.shout, runs
 * DIR/workflow.lua as a tracked flow run (drover_exec), then packages,
 * deploys and runs DIR/hello_job.lua on the local backend through the
 * JSON contract calls, and waits for that run to complete.  The store is
 * $DROVER_HOME (default ~/.drover).
 */
#include <drover.h>
#include <lauxlib.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* drover.host.shout(word) -> WORD; counts its calls in the int it was
 * registered with. */
static int shout(lua_State *L) {
  int *calls = (int *)drover_host_ud(L);
  size_t n, i;
  const char *s = luaL_checklstring(L, 1, &n);
  luaL_Buffer b;
  char *p = luaL_buffinitsize(L, &b, n);
  for (i = 0; i < n; i++) p[i] = (char)toupper((unsigned char)s[i]);
  luaL_pushresultsize(&b, n);
  (*calls)++;
  return 1;
}

/* The string value of "key" in a flat JSON text (enough for the ids and
 * states below; a real program would use its JSON library). */
static void json_field(const char *json, const char *key, char *out, size_t size) {
  char pat[64];
  const char *p, *q;
  snprintf(pat, sizeof pat, "\"%s\":\"", key);
  out[0] = '\0';
  p = json ? strstr(json, pat) : NULL;
  if (p == NULL) return;
  p += strlen(pat);
  q = strchr(p, '"');
  if (q && (size_t)(q - p) < size) snprintf(out, size, "%.*s", (int)(q - p), p);
}

static int fail(drover *D, const char *what, int rc) {
  fprintf(stderr, "embed: %s failed (%d): %s\n", what, rc, drover_errmsg(D));
  drover_close(D);
  return 1;
}

static void on_log(void *ud, const char *level, const char *message) {
  (void)ud;
  fprintf(stderr, "embed [%s] %s\n", level, message);
}

int main(int argc, char **argv) {
  const char *dir = argc > 1 ? argv[1] : ".";
  char path[4096], args[8192], id[128], state[32];
  char *out = NULL;
  int calls = 0, rc;
  time_t deadline;
  drover_options o;
  drover *D;

  memset(&o, 0, sizeof o);
  o.log = on_log; /* drover.log() lines and engine errors come here */
  D = drover_open(&o);
  if (D == NULL) return 1;
  if (*drover_errmsg(D)) return fail(D, "drover_open", DROVER_ELOAD);
  if ((rc = drover_register(D, "shout", shout, &calls)) != DROVER_OK) return fail(D, "drover_register", rc);

  /* 1. a workflow file, as one tracked flow run that calls back into C */
  snprintf(path, sizeof path, "%s/workflow.lua", dir);
  rc = drover_exec(D, path, "{\"words\": [\"hello\", \"from\", \"c\"]}", &out);
  if (rc != DROVER_OK) return fail(D, "drover_exec", rc);
  json_field(out, "state", state, sizeof state);
  printf("workflow %s, host function called %d times\n", state, calls);
  {
    /* what the workflow returned: {"id":...,"result":VALUE,"state":...} */
    const char *r = strstr(out, "\"result\":");
    const char *end = r ? strstr(r, ",\"state\":") : NULL;
    if (r && end) printf("result: %.*s\n", (int)(end - r - 9), r + 9);
  }
  drover_free(out);

  /* 2. the local backend through the contract: package, deploy, run, status, logs */
  snprintf(args, sizeof args, "[\"HelloJob\", \"hello_job\", \"main\", {\"path\": \"%s\"}]", dir);
  if ((rc = drover_backend_call(D, "local", NULL, "package", args, &out)) != DROVER_OK)
    return fail(D, "package", rc);
  json_field(out, "id", id, sizeof id);
  drover_free(out);
  printf("packaged %.12s\n", id);

  snprintf(args, sizeof args,
           "[\"hello-embed\", {\"package\": \"%s\", \"params\": {\"who\": \"embedder\"}, \"replace\": true}]", id);
  if ((rc = drover_backend_call(D, "local", NULL, "deploy", args, &out)) != DROVER_OK)
    return fail(D, "deploy", rc);
  drover_free(out);
  printf("deployed hello-embed\n");

  if ((rc = drover_backend_call(D, "local", NULL, "run", "[\"hello-embed\", {}]", &out)) != DROVER_OK)
    return fail(D, "run", rc);
  sscanf(out, "[\"%127[^\"]\"", id); /* run returns [id, url] */
  drover_free(out);

  snprintf(args, sizeof args, "[\"%s\"]", id);
  deadline = time(NULL) + 60;
  do {
    if ((rc = drover_backend_call(D, "local", NULL, "status", args, &out)) != DROVER_OK)
      return fail(D, "status", rc);
    json_field(out, "state", state, sizeof state);
    drover_free(out);
    if (strcmp(state, "COMPLETED") && strcmp(state, "FAILED") && strcmp(state, "CRASHED")) usleep(100000);
    else break;
  } while (time(NULL) < deadline);
  printf("run %s\n", state);

  if ((rc = drover_backend_call(D, "local", NULL, "logs", args, &out)) != DROVER_OK)
    return fail(D, "logs", rc);
  printf("logs: %s\n", out); /* a JSON array of lines */
  drover_free(out);

  drover_close(D);
  D = NULL; /* closing twice is harmless, but the address may be reused */
  return strcmp(state, "COMPLETED") == 0 ? 0 : 1;
}
