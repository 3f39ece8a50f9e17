#!/usr/bin/env python3
"""bench/own_cpu.py CMD [ARG...] -- run CMD (stdout to /dev/null), print
"WALL_NS OWN_CPU_NS" and exit with its exit code.

OWN_CPU_NS is the CPU time of CMD's own process, every thread of it, not
of the children it starts.  That is the figure a runner's overhead per task
shows in -- every runner pays the same children -- and, being CPU time
rather than wall time, it moves less with other work on a shared machine.

The main thread's is read from /proc/PID/schedstat while CMD is a zombie
(waitid with WNOWAIT), before it is reaped.  Other threads (drover's store
writer runs on libuv's worker threads) are gone by then, and a zombie's
/proc/PID/stat sums them only in 10 ms ticks: so their schedstat is read
every 10 ms while CMD runs, and the last reading of each counts.  A thread
works at most the last interval unseen; drover's are idle at the end (its
last batch is waited for before the store closes).
"""
import os
import sys
import threading
import time


def read_ns(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main():
    if len(sys.argv) < 2:
        sys.stderr.write("usage: own_cpu.py CMD [ARG...]\n")
        return 2
    actions = [(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)]
    t0 = time.monotonic_ns()
    pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=actions)
    others = {}  # tid -> last schedstat reading of a thread other than the main one
    done = threading.Event()

    def watch():
        base = "/proc/%d/task" % pid
        while not done.wait(0.01):
            try:
                tids = os.listdir(base)
            except OSError:
                return
            for tid in tids:
                if int(tid) == pid:
                    continue
                ns = read_ns("%s/%s/schedstat" % (base, tid))
                if ns is not None:
                    others[tid] = ns

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    t1 = time.monotonic_ns()
    done.set()
    watcher.join()
    cpu = read_ns("/proc/%d/schedstat" % pid) + sum(others.values())
    _, status = os.waitpid(pid, 0)
    print(t1 - t0, cpu)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
