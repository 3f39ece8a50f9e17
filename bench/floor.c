/*
 * floor.c -- the floor under bench/dag.sh: the same task graph run by the
 * least a program can do.  Every node is a `true` started with posix_spawn
 * and reaped with waitpid, at most J at a time, each started only once the
 * nodes it depends on have exited; nothing is tracked, logged or stored.
 * `true` is looked up in PATH once, at the start (a shell's hash): the
 * runners search PATH for every command (make and drover with a stat or
 * access per entry, posix_spawnp with a failed execve per entry in the
 * child), which the floor does not need to.  What drover (or make) spends
 * above this is its own cost.
 *
 *   floor DEPS_FILE [J]        (J defaults to 2)
 *
 * DEPS_FILE is bench/dag_gen.lua's `deps` output: line i is "i: d1 d2 ..."
 * (nodes 1..N, each depending on earlier ones).  Ready nodes start in the
 * order they became ready (in node order at the start).  Exits non-zero,
 * naming what failed, if a line is malformed or a `true` fails.
 */
#include <errno.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

typedef struct {
  int *v;
  int len, cap;
} ivec_t;

static void ivec_push(ivec_t *a, int x) {
  if (a->len == a->cap) {
    a->cap = a->cap ? 2 * a->cap : 4;
    a->v = realloc(a->v, a->cap * sizeof(*a->v));
    if (a->v == NULL) {
      perror("floor: realloc");
      exit(1);
    }
  }
  a->v[a->len++] = x;
}

/* The first executable NAME in PATH (malloc'ed), or NULL. */
static char *which(const char *name) {
  const char *path = getenv("PATH"), *p, *end;
  if (path == NULL) path = "/bin:/usr/bin";
  for (p = path;; p = end + 1) {
    size_t n;
    char *cand;
    end = strchr(p, ':');
    if (end == NULL) end = p + strlen(p);
    n = (size_t)(end - p);
    cand = malloc(n + strlen(name) + 2);
    if (cand == NULL) return NULL;
    sprintf(cand, "%.*s%s%s", (int)n, p, n ? "/" : "", name);
    if (access(cand, X_OK) == 0) return cand;
    free(cand);
    if (*end == '\0') return NULL;
  }
}

int main(int argc, char **argv) {
  char line[65536];
  char *argv_true[] = { "true", NULL };
  char *true_path = which("true");
  ivec_t *dependents;  /* dependents[d]: the nodes that wait for node d */
  int *waiting;        /* waiting[i]: dependencies of node i not yet exited */
  int *ready;          /* FIFO of nodes whose dependencies have all exited */
  pid_t *pid_of;       /* pid_of[k]: the process of running slot k */
  int *node_of;        /* node_of[k]: the node of running slot k */
  int n, j, head, tail, running, done, i, k, status;
  FILE *f;

  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: floor DEPS_FILE [J]\n");
    return 2;
  }
  if (true_path == NULL) {
    fprintf(stderr, "floor: no executable 'true' in PATH\n");
    return 1;
  }
  j = argc == 3 ? atoi(argv[2]) : 2;
  if (j < 1) {
    fprintf(stderr, "floor: bad argument 'J' (a positive integer expected, got '%s')\n", argv[2]);
    return 2;
  }
  f = fopen(argv[1], "r");
  if (f == NULL) {
    fprintf(stderr, "floor: %s: %s\n", argv[1], strerror(errno));
    return 1;
  }

  /* Count the nodes, then read the edges. */
  n = 0;
  while (fgets(line, sizeof(line), f) != NULL)
    if (line[0] != '\n') n++;
  rewind(f);
  dependents = calloc(n + 1, sizeof(*dependents));
  waiting = calloc(n + 1, sizeof(*waiting));
  ready = calloc(n + 1, sizeof(*ready));
  pid_of = calloc(j, sizeof(*pid_of));
  node_of = calloc(j, sizeof(*node_of));
  if (!dependents || !waiting || !ready || !pid_of || !node_of) {
    perror("floor: calloc");
    return 1;
  }
  while (fgets(line, sizeof(line), f) != NULL) {
    char *p, *end;
    long node, dep;
    if (line[0] == '\n') continue;
    node = strtol(line, &end, 10);
    if (end == line || *end != ':' || node < 1 || node > n) {
      fprintf(stderr, "floor: %s: bad line '%s'\n", argv[1], line);
      return 1;
    }
    for (p = end + 1;; p = end) {
      dep = strtol(p, &end, 10);
      if (end == p) break;
      if (dep < 1 || dep >= node) {
        fprintf(stderr, "floor: %s: node %ld depends on %ld\n", argv[1], node, dep);
        return 1;
      }
      ivec_push(&dependents[dep], (int) node);
      waiting[node]++;
    }
  }
  fclose(f);

  head = tail = 0;
  for (i = 1; i <= n; i++)
    if (waiting[i] == 0) ready[tail++] = i;
  running = done = 0;
  while (done < n) {
    /* Start ready nodes while a slot is free. */
    while (running < j && head < tail) {
      int node = ready[head++];
      pid_t pid;
      int err = posix_spawn(&pid, true_path, NULL, NULL, argv_true, environ);
      if (err != 0) {
        fprintf(stderr, "floor: posix_spawn(%s): %s\n", true_path, strerror(err));
        return 1;
      }
      pid_of[running] = pid;
      node_of[running] = node;
      running++;
    }
    if (running == 0) {
      fprintf(stderr, "floor: %d of %d nodes can never start (a cycle?)\n", n - done, n);
      return 1;
    }
    /* Reap one, then release its dependents. */
    {
      pid_t pid = waitpid(-1, &status, 0);
      int node;
      if (pid < 0) {
        if (errno == EINTR) continue;
        perror("floor: waitpid");
        return 1;
      }
      for (k = 0; k < running && pid_of[k] != pid; k++);
      if (k == running) continue; /* not ours */
      node = node_of[k];
      pid_of[k] = pid_of[running - 1];
      node_of[k] = node_of[running - 1];
      running--;
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "floor: node %d: true failed (status %d)\n", node, status);
        return 1;
      }
      done++;
      for (i = 0; i < dependents[node].len; i++) {
        int d = dependents[node].v[i];
        if (--waiting[d] == 0) ready[tail++] = d;
      }
    }
  }
  return 0;
}
