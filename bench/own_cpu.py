#!/usr/bin/env python3
"""bench/own_cpu.py CMD [ARG...] -- run CMD (stdout to /dev/null), print
"WALL_NS OWN_CPU_NS" and exit with its exit code.

OWN_CPU_NS is the CPU time of CMD's own process, not of the children it
starts: read from /proc/PID/schedstat while CMD is a zombie (waitid with
WNOWAIT), before it is reaped.  That is the figure a runner's overhead per
task shows in -- every runner pays the same children -- and, being CPU
time rather than wall time, it moves less with other work on a shared
machine.  schedstat counts the main thread only; drover, make and the
floor start no threads on these runs.
"""
import os
import sys
import time


def main():
    if len(sys.argv) < 2:
        sys.stderr.write("usage: own_cpu.py CMD [ARG...]\n")
        return 2
    actions = [(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)]
    t0 = time.monotonic_ns()
    pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=actions)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    t1 = time.monotonic_ns()
    with open("/proc/%d/schedstat" % pid) as f:
        cpu = int(f.read().split()[0])
    _, status = os.waitpid(pid, 0)
    print(t1 - t0, cpu)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
