/*
 * tap.h -- a tiny test harness in the spirit of libuv's: each test runs in
 * a forked child with a timeout, so a crash or a hang fails that one test
 * and the rest still run.  Output is TAP ("ok N - name").
 */
#ifndef DRV_TAP_H
#define DRV_TAP_H
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef void (*tap_fn)(void);
typedef struct { const char *name; tap_fn fn; } tap_test;

static int tap__failed_in_child;

#define CHECK(cond)                                                           \
  do {                                                                        \
    if (!(cond)) {                                                            \
      fprintf(stderr, "  %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      tap__failed_in_child = 1;                                               \
      return;                                                                 \
    }                                                                         \
  } while (0)

#define CHECK_STR(a, b)                                                       \
  do {                                                                        \
    const char *a_ = (a), *b_ = (b);                                          \
    if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0) {                    \
      fprintf(stderr, "  %s:%d: \"%s\" != \"%s\"\n", __FILE__, __LINE__,      \
              a_ ? a_ : "(null)", b_ ? b_ : "(null)");                        \
      tap__failed_in_child = 1;                                               \
      return;                                                                 \
    }                                                                         \
  } while (0)

static int tap_run(const tap_test *tests, int timeout_s) {
  int i, n = 0, failed = 0;
  for (i = 0; tests[i].name; i++) n++;
  printf("1..%d\n", n);
  for (i = 0; i < n; i++) {
    pid_t pid;
    int status = 0;
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
      alarm((unsigned)timeout_s);
      tests[i].fn();
      fflush(stdout);
      _exit(tap__failed_in_child ? 1 : 0);
    }
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      printf("ok %d - %s\n", i + 1, tests[i].name);
    } else {
      failed++;
      if (WIFSIGNALED(status))
        printf("not ok %d - %s (signal %d%s)\n", i + 1, tests[i].name, WTERMSIG(status),
               WTERMSIG(status) == SIGALRM ? ": timed out" : "");
      else
        printf("not ok %d - %s\n", i + 1, tests[i].name);
    }
  }
  return failed ? 1 : 0;
}
#endif
