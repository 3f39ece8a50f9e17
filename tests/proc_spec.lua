-- drover.proc: real child processes, real pipes, real process groups.
local drover = require "drover"
local H = require "helper"
local P = drover.proc

--- true if pid names a live process.  A zombie counts as dead: here, as in
-- many containers, PID 1 may never reap orphans, so `kill -0` alone would
-- report a killed grandchild as alive forever.
local function alive(pid)
  local r = assert(P.run({ "kill", "-0", tostring(pid) }, { stderr = "null" }))
  if r.code ~= 0 then return false end
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function write_file(path, data, mode)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  if mode then os.execute("chmod " .. mode .. " " .. path) end
end

local function seq(n)
  local t = {}
  for i = 1, n do t[i] = tostring(i) end
  return table.concat(t, "\n") .. "\n"
end

--- drover.run of n tasks at once, task i running P.run(argv_of(i)): the
-- results, in order.
local function run_each(n, argv_of)
  return drover.run(function()
    local hs = {}
    for i = 1, n do
      hs[i] = drover.spawn(function() return P.run(argv_of(i)) end)
    end
    local out = {}
    for i, h in ipairs(hs) do out[i] = h:join() end
    return out
  end)
end

local tmp
setup(function() tmp = H.tempdir() end)
teardown(function() if tmp then os.execute("rm -rf " .. tmp) end end)

describe("drover.proc.run", function()
  it("returns the exit code", function()
    assert.are.equal(0, P.run({ "true" }).code)
    assert.are.equal(1, P.run({ "false" }).code)
    local r = P.run({ "sh", "-c", "exit 3" })
    assert.are.equal(3, r.code)
    assert.are.equal(0, r.signal)
    assert.is_false(r.timed_out)
    assert.is_number(r.duration)
    assert.is_true(r.duration >= 0 and r.duration < 30)
  end)

  it("reports death by signal as code 128+signal", function()
    local r = P.run({ "sh", "-c", "kill -USR1 $$" })
    assert.are.equal(10, r.signal)
    assert.are.equal(138, r.code)
    assert.is_false(r.timed_out)
  end)

  it("captures stdout and stderr separately", function()
    local r = P.run({ "sh", "-c", "echo out; echo err >&2; echo out2" })
    assert.are.equal("out\nout2\n", r.stdout)
    assert.are.equal("err\n", r.stderr)
  end)

  it("passes arguments verbatim, without a shell", function()
    local r = P.run({ "printf", "%s|", "a b", "$HOME", "*", "'q'", 42 })
    assert.are.equal("a b|$HOME|*|'q'|42|", r.stdout)
  end)

  it("is binary-safe", function()
    local r = P.run({ "printf", "a\\000b\\377\\001" })
    assert.are.equal("a\0b\255\1", r.stdout)
    local data = "x\0y\0\255\n\0"
    assert.are.equal(data, P.run({ "cat" }, { stdin = data }).stdout)
  end)

  it("captures several MB on both pipes completely", function()
    local r = P.run({ "sh", "-c", "seq 1 800000; seq 1 800000 >&2" })
    local want = seq(800000)
    assert.is_true(#want > 5 * 1024 * 1024)
    assert.are.equal(0, r.code)
    assert.are.equal(#want, #r.stdout)
    assert.are.equal(want, r.stdout)
    assert.are.equal(want, r.stderr)
  end)

  it("feeds a stdin string, large ones too", function()
    assert.are.equal("hello", P.run({ "cat" }, { stdin = "hello" }).stdout)
    assert.are.equal("", P.run({ "cat" }, { stdin = "" }).stdout)
    local big = string.rep("0123456789abcdef", 256 * 1024) -- 4 MB
    local r = P.run({ "wc", "-c" }, { stdin = big })
    assert.are.equal(#big, tonumber(r.stdout))
    assert.are.equal(big, P.run({ "cat" }, { stdin = big }).stdout)
  end)

  it("gives the child /dev/null as stdin by default", function()
    local r = P.run({ "cat" })
    assert.are.equal(0, r.code)
    assert.are.equal("", r.stdout)
  end)

  it("survives a child that exits without reading its stdin", function()
    local r = P.run({ "true" }, { stdin = string.rep("x", 8 * 1024 * 1024) })
    assert.are.equal(0, r.code)
  end)

  it("runs in cwd", function()
    local real = P.run({ "realpath", tmp }).stdout
    assert.are.equal(real, P.run({ "pwd" }, { cwd = tmp }).stdout)
  end)

  it("merges env into the parent's environment", function()
    local home = os.getenv("HOME") or ""
    local r = P.run({ "sh", "-c", 'printf "%s|%s|%s" "$DROVER_T1" "$DROVER_T2" "$HOME"' },
      { env = { DROVER_T1 = "one", DROVER_T2 = 2 } })
    assert.are.equal("one|2|" .. home, r.stdout)
    -- false removes a variable
    r = P.run({ "sh", "-c", 'printf "%s" "${HOME-unset}"' }, { env = { HOME = false } })
    assert.are.equal("unset", r.stdout)
  end)

  it("clear_env leaves only the given variables, and still finds programs", function()
    local r = P.run({ "env" }, { clear_env = true, env = { ONLY = "me" } })
    assert.are.equal("ONLY=me\n", r.stdout)
    r = P.run({ "env" }, { clear_env = true })
    assert.are.equal("", r.stdout)
  end)

  it("appends stdout and stderr to files", function()
    local out, err = tmp .. "/out.log", tmp .. "/err.log"
    for i = 1, 2 do
      local r = P.run({ "sh", "-c", "echo o" .. i .. "; echo e" .. i .. " >&2" }, { stdout = out, stderr = err })
      assert.are.equal(0, r.code)
      assert.is_nil(r.stdout)
      assert.is_nil(r.stderr)
    end
    assert.are.equal("o1\no2\n", read_file(out))
    assert.are.equal("e1\ne2\n", read_file(err))
    local r, msg = P.run({ "true" }, { stdout = tmp .. "/no/such/dir/x" })
    assert.is_nil(r)
    assert.matches("cannot open stdout file '.*no/such/dir/x': no such file or directory", msg)
  end)

  it("discards output with 'null'", function()
    local r = P.run({ "sh", "-c", "echo lost; echo lost >&2" }, { stdout = "null", stderr = "null" })
    assert.are.equal(0, r.code)
    assert.is_nil(r.stdout)
    assert.is_nil(r.stderr)
  end)

  it("streams chunks to functions", function()
    local chunks, errs, streams = {}, {}, {}
    local r = P.run({ "sh", "-c", "seq 1 100000; echo bad >&2" }, {
      stdout = function(c, name) chunks[#chunks + 1] = c; streams[name] = true end,
      stderr = function(c) errs[#errs + 1] = c end,
    })
    assert.are.equal(0, r.code)
    assert.is_nil(r.stdout)
    assert.are.equal(seq(100000), table.concat(chunks))
    assert.are.equal("bad\n", table.concat(errs))
    assert.is_true(streams.stdout)
    assert.is_nil(r.callback_error)
  end)

  it("reports an error raised by a callback as callback_error", function()
    local calls = 0
    local r = P.run({ "sh", "-c", "seq 1 100000" }, {
      stdout = function() calls = calls + 1; error("boom in callback") end,
    })
    assert.are.equal(0, r.code)
    assert.are.equal(1, calls) -- not called again after failing
    assert.matches("boom in callback", r.callback_error)
    -- waiting inside a callback is refused the same way, not a crash
    r = P.run({ "echo", "x" }, { stdout = function() drover.sleep(1) end })
    assert.are.equal(0, r.code)
    assert.matches("cannot wait", r.callback_error)
  end)

  it("returns nil and a message when the program cannot be started", function()
    local r, msg = P.run({ "drover-no-such-program" })
    assert.is_nil(r)
    assert.are.equal("drover.proc.run: cannot start 'drover-no-such-program': no such file or directory", msg)
    local script = tmp .. "/not-executable.sh"
    write_file(script, "#!/bin/sh\necho hi\n", "644")
    r, msg = P.run({ script })
    assert.is_nil(r)
    assert.matches("cannot start '.*not%-executable.sh': permission denied", msg)
    r, msg = P.run({ "pwd" }, { cwd = tmp .. "/missing" })
    assert.is_nil(r)
    assert.matches("cannot start 'pwd': cwd '.*/missing': no such file or directory", msg)
    local p
    p, msg = P.spawn({ "/nonexistent/bin/x" })
    assert.is_nil(p)
    assert.matches("drover.proc.spawn: cannot start '/nonexistent/bin/x'", msg)
  end)

  it("runs an executable script by path", function()
    local script = tmp .. "/ok.sh"
    write_file(script, "#!/bin/sh\necho \"script $1\"\n", "755")
    assert.are.equal("script arg\n", P.run({ script, "arg" }).stdout)
  end)

  it("times out: SIGTERM to the whole group, code 124", function()
    local r = P.run({ "sh", "-c", "sleep 100 & echo $!; sleep 100" }, { timeout = 0.3 })
    assert.are.equal(124, r.code)
    assert.is_true(r.timed_out)
    assert.are.equal(15, r.signal)
    local grandchild = tonumber(r.stdout:match("%d+"))
    assert.is_number(grandchild)
    H.wait_until(function() return not alive(grandchild) end, 30, "the grandchild to die")
    assert.is_false(alive(r.pid))
  end)

  it("does not time out a process that finishes in time", function()
    local r = P.run({ "echo", "quick" }, { timeout = 30 })
    assert.are.equal(0, r.code)
    assert.is_false(r.timed_out)
    assert.are.equal("quick\n", r.stdout)
    assert.are.equal(0, P.run({ "true" }, { timeout = math.huge }).code)
  end)

  it("times out a group that ignores SIGTERM with SIGKILL after kill_grace", function()
    -- wait until the shell has set its trap (it echoes after), so a loaded
    -- machine cannot deliver the TERM before the trap exists
    local out = {}
    local p = assert(P.spawn({ "sh", "-c", "trap '' TERM; sleep 100 & echo $!; sleep 100" },
      { kill_grace = 0.3, stdout = function(chunk) out[#out + 1] = chunk end }))
    H.wait_until(function() return #out > 0 end, 30, "the shell to set its trap")
    local t0 = drover.now()
    local r = p:wait(0.2)
    assert.are.equal(124, r.code)
    assert.is_true(r.timed_out)
    assert.are.equal(9, r.signal)
    assert.is_true(drover.now() - t0 >= 0.45)
    local grandchild = tonumber(table.concat(out):match("%d+"))
    H.wait_until(function() return not alive(grandchild) end, 30, "the grandchild to die")
  end)

  it("works inside tasks, many processes concurrently", function()
    local results = run_each(30, function(i) return { "sh", "-c", "echo $1; echo e$1 >&2", "sh", i } end)
    for i = 1, 30 do
      assert.are.equal(i .. "\n", results[i].stdout)
      assert.are.equal("e" .. i .. "\n", results[i].stderr)
      assert.are.equal(0, results[i].code)
    end
  end)

  it("finishes 150 children that end at once, each one's output whole", function()
    -- more ready pipes and exits in one loop turn than one batch of the
    -- engine's epoll set holds (64), and outputs bigger than a pipe's buffer
    local results = run_each(150, function(i)
      return { "sh", "-c", 'sleep 0.5; head -c "$1" /dev/zero | tr "\\0" x; echo "e$1" >&2', "sh", tostring(i * 1000) }
    end)
    for i = 1, 150 do
      assert.are.equal(0, results[i].code)
      assert.are.equal(string.rep("x", i * 1000), results[i].stdout)
      assert.are.equal("e" .. i * 1000 .. "\n", results[i].stderr)
    end
  end)

  it("runs 20 sleeps in parallel tasks in far less than serial time", function()
    local elapsed = drover.run(function()
      local t0 = drover.now()
      local hs = {}
      for i = 1, 20 do
        hs[i] = drover.spawn(function() return P.run({ "sleep", "0.3" }).code end)
      end
      for _, h in ipairs(hs) do assert.are.equal(0, h:join()) end
      return drover.now() - t0
    end)
    assert.is_true(elapsed >= 0.3)
    assert.is_true(elapsed < 20 * 0.3 / 2, "took " .. elapsed .. " s")
  end)
end)

describe("drover.proc.spawn", function()
  it("has a pid, is_running and wait", function()
    local p = assert(P.spawn({ "sh", "-c", "read x; echo got $x" }, { stdin = true }))
    assert.is_true(math.type(p.pid) == "integer" and p.pid > 0)
    assert.is_true(p:is_running())
    assert.matches("drover.proc%(%d+, running%)", tostring(p))
    assert.is_true(p:write("it\n"))
    local r = p:wait()
    assert.are.equal("got it\n", r.stdout)
    assert.is_false(p:is_running())
    assert.are.equal(r, p:wait()) -- the result is kept
    assert.are.equal(p.pid, r.pid)
  end)

  it("writes to stdin and closes it", function()
    local p = assert(P.spawn({ "cat" }, { stdin = true }))
    assert.is_true(p:write("abc"))
    assert.is_true(p:write(""))
    assert.is_true(p:write(string.rep("z", 3 * 1024 * 1024))) -- larger than any pipe buffer
    assert.is_true(p:write("\0end"))
    p:close()
    p:close() -- idempotent
    local ok, msg = p:write("late")
    assert.is_nil(ok)
    assert.are.equal("stdin is closed", msg)
    local r = p:wait()
    assert.are.equal("abc" .. string.rep("z", 3 * 1024 * 1024) .. "\0end", r.stdout)
  end)

  it("writes from tasks while another task reads the result", function()
    local out = drover.run(function()
      local p = assert(P.spawn({ "sort" }, { stdin = true }))
      local reader = drover.spawn(function() return p:wait().stdout end)
      for _, w in ipairs({ "c\n", "a\n", "b\n" }) do assert.is_true(p:write(w)) end
      p:close()
      return reader:join()
    end)
    assert.are.equal("a\nb\nc\n", out)
  end)

  it("refuses write when stdin is not a pipe", function()
    local p = assert(P.spawn({ "true" }))
    assert.has_error(function() p:write("x") end,
      "proc:write: stdin is not a pipe (spawn with opts.stdin = true)")
    p:wait()
  end)

  it("kills the whole group with a signal given by name or number", function()
    local marker = tmp .. "/kill-gc"
    -- the grandchild does not hold the pipe: wait() returns as soon as sh dies
    local p = assert(P.spawn({ "sh", "-c", "sleep 100 >/dev/null 2>&1 & echo $! > " .. marker .. "; wait" }))
    H.wait_until(function() local s = read_file(marker); return s and s:match("%d+\n") end, 30, "marker")
    local grandchild = tonumber(read_file(marker):match("%d+"))
    assert.is_true(alive(grandchild))
    assert.is_true(p:kill("KILL"))
    local r = p:wait()
    assert.are.equal(9, r.signal)
    assert.are.equal(137, r.code)
    assert.is_false(r.timed_out)
    H.wait_until(function() return not alive(grandchild) end, 30, "the grandchild to die")

    for _, sig in ipairs({ { 15, 15 }, { "TERM", 15 }, { "SIGINT", 2 }, { "hup", 1 } }) do
      local q = assert(P.spawn({ "sleep", "100" }))
      assert.is_true(q:kill(sig[1]))
      assert.are.equal(sig[2], q:wait().signal)
    end
    local q = assert(P.spawn({ "sleep", "100" }))
    assert.is_true(q:kill()) -- default SIGTERM
    assert.are.equal(143, q:wait().code)
    local ok, msg = q:kill()
    assert.is_nil(ok)
    assert.are.equal("no such process", msg)
  end)

  it("wait(timeout) stops the group like vim.system", function()
    local p = assert(P.spawn({ "sh", "-c", "sleep 100 & echo $!; sleep 100" }))
    local r = p:wait(0.2)
    assert.are.equal(124, r.code)
    assert.is_true(r.timed_out)
    local grandchild = tonumber(r.stdout:match("%d+"))
    H.wait_until(function() return not alive(grandchild) end, 30, "the grandchild to die")
    -- a process that finishes before the deadline is not affected
    r = assert(P.spawn({ "true" })):wait(30)
    assert.are.equal(0, r.code)
    assert.is_false(r.timed_out)
  end)

  it("a cancelled task kills the group and wakes only after the child exited", function()
    local marker = tmp .. "/cancel-pids"
    os.remove(marker)
    drover.run(function()
      local t = drover.spawn(function()
        return P.run({ "sh", "-c", "sleep 100 & echo $$ $! > " .. marker .. "; wait" })
      end)
      H.wait_until(function() local s = read_file(marker); return s and s:match("%d+ %d+\n") end, 30, "marker")
      local leader, grandchild = read_file(marker):match("(%d+) (%d+)")
      assert.is_true(alive(grandchild))
      assert.is_true(t:cancel())
      local ok, err = t:wait()
      assert.is_false(ok)
      assert.are.equal("cancelled", err)
      -- drover reaped the leader before waking the task
      assert.is_false(alive(leader))
      H.wait_until(function() return not alive(grandchild) end, 30, "the grandchild to die")
    end)
  end)

  it("a cancel escalates to SIGKILL for a group that ignores SIGTERM", function()
    local marker = tmp .. "/cancel-term"
    os.remove(marker)
    drover.run(function()
      local p = assert(P.spawn({ "sh", "-c", "trap '' TERM; echo $$ > " .. marker .. "; sleep 100" },
        { kill_grace = 0.2 }))
      local t = drover.spawn(function() return p:wait() end)
      H.wait_until(function() local s = read_file(marker); return s and s:match("%d+\n") end, 30, "marker")
      -- the marker may be there before t has even run: cancel only a waiting t
      H.wait_until(function() return t:status() == "waiting" end, 30, "the waiter to block")
      t:cancel()
      local ok, err = t:wait()
      assert.is_false(ok)
      assert.are.equal("cancelled", err)
      local r = p:wait()
      assert.are.equal(9, r.signal)
      assert.is_false(alive(p.pid))
    end)
  end)

  it("a cancelled writer abandons stdin instead of hanging", function()
    drover.run(function()
      -- the child never reads: a large write cannot finish
      local p = assert(P.spawn({ "sleep", "100" }, { stdin = true }))
      local w = drover.spawn(function() return p:write(string.rep("x", 16 * 1024 * 1024)) end)
      H.wait_until(function() return w:status() == "waiting" end, 30, "the writer to block")
      w:cancel()
      local ok, err = w:wait()
      assert.is_false(ok)
      assert.are.equal("cancelled", err)
      p:kill("KILL")
      assert.are.equal(9, p:wait().signal)
    end)
  end)
end)

-- How the child is set up.  Children are started with clone (spawn.c) and
-- watched through a pidfd, or with libuv's uv_spawn when DROVER_SPAWN=uv
-- (tests/proc_uvspawn_spec.lua runs this whole file that way): the child
-- must not be able to tell the difference, except for the kind of pipe.
local uv_mode = os.getenv("DROVER_SPAWN") == "uv"
describe("drover.proc child setup", function()

  --- drover's own pid: the parent of a direct child.
  local function drover_pid()
    return tonumber(P.run({ "sh", "-c", "echo $PPID" }).stdout)
  end

  --- fd -> readlink target of /proc/PID/fd/*, listed by a child.  The child
  -- waits for a line on stdin, sent once spawn has returned: until then
  -- drover may still hold its copies of the child's ends of the pipes.
  local function fds_of(pid)
    local p = assert(P.spawn({ "sh", "-c", 'read -r go; cd /proc/"$1"/fd && for f in *; do echo "$f $(readlink "$f")"; done',
      "sh", pid }, { stdin = true }))
    assert.is_true(p:write("go\n")) -- stdin stays open (and listed) until the child exits
    local r = p:wait()
    local t = {}
    for fd, target in r.stdout:gmatch("(%d+) ([^\n]*)") do t[tonumber(fd)] = target end
    return t
  end

  it("starts each child as the leader of a new session and process group", function()
    -- /proc/self/stat of the child itself: pid, (comm), state, ppid, pgrp, session
    local stat = P.run({ "cat", "/proc/self/stat" }).stdout
    local pid, ppid, pgrp, sid = stat:match("^(%d+) %b() %a (%d+) (%d+) (%d+)")
    assert.are.equal(pid, pgrp)
    assert.are.equal(pid, sid)
    assert.are.equal(drover_pid(), tonumber(ppid))
  end)

  it("resets every signal to its default disposition and blocks none", function()
    -- stdin as a pipe makes drover ignore SIGPIPE; the child must not inherit that
    local r = P.run({ "sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/$PPID/status; exec grep -E '^Sig(Ign|Blk)' /proc/self/status" },
      { stdin = "x" })
    local lines = {}
    for name, mask in r.stdout:gmatch("(Sig%a+):%s*(%x+)") do lines[#lines + 1] = { name, tonumber(mask, 16) } end
    assert.are.equal(4, #lines, r.stdout) -- drover's SigBlk, SigIgn, then the child's
    assert.are.equal("SigIgn", lines[2][1])
    assert.are.equal(1 << (13 - 1), lines[2][2] & (1 << (13 - 1))) -- drover ignores SIGPIPE (13)
    -- the child: nothing blocked, nothing ignored -- not even glibc's internal
    -- signals 32 and 33, which glibc's posix_spawn would leave ignored, but
    -- which uv_spawn does not reset (it resets 1-31: lua5.4 started by
    -- busted through system(), i.e. posix_spawn, ignores them)
    assert.are.same({ "SigBlk", 0 }, lines[3])
    assert.are.equal("SigIgn", lines[4][1])
    assert.are.equal(0, lines[4][2] & (uv_mode and 0x7fffffff or -1), r.stdout)
  end)

  it("gives the child /dev/null, " .. (uv_mode and "socketpairs (uv_spawn)" or "pipes (clone)")
    .. " or files as stdio", function()
    local r = P.run({ "sh", "-c", "readlink /proc/self/fd/0 /proc/self/fd/1 /proc/self/fd/2" })
    local stdin, stdout, stderr = r.stdout:match("^(%S+)\n(%S+)\n(%S+)\n$")
    assert.are.equal("/dev/null", stdin)
    local kind = uv_mode and "socket" or "pipe"
    assert.matches("^" .. kind .. ":%[%d+%]$", stdout)
    assert.matches("^" .. kind .. ":%[%d+%]$", stderr)
    -- fd 3: a copy of the child's stdout, since readlink's own goes to stderr
    r = P.run({ "sh", "-c", "readlink /proc/self/fd/0 /proc/self/fd/3 3>&1 >&2" }, { stdin = "", stdout = "null" })
    assert.matches("^" .. kind .. ":%[%d+%]\n/dev/null\n$", r.stderr)
    local out = tmp .. "/stdio-file"
    r = P.run({ "sh", "-c", "readlink /proc/self/fd/3 /proc/self/fd/2 3>&1 >&2" }, { stdout = out })
    assert.are.equal(out .. "\n" .. (uv_mode and "socket" or "pipe"), r.stderr:match("^(.-):"))
  end)

  it("leaks no descriptor into other children, nor out of drover", function()
    local me = drover_pid()
    collectgarbage() -- files some other code left to the collector must not count
    collectgarbage()
    local before = fds_of(me)
    -- a child that keeps its stdin pipe and its output pipes open
    local a = assert(P.spawn({ "cat" }, { stdin = true }))
    local afds = fds_of(a.pid)
    assert.is_not_nil(afds[0])
    local bfds = fds_of("self")
    for fd, target in pairs(bfds) do
      if fd > 2 then
        assert.is_nil(target:match("pidfd"), "fd " .. fd .. " " .. target)
        for i = 0, 2 do assert.are_not.equal(afds[i], target, "fd " .. fd .. " is the other child's fd " .. i) end
      end
    end
    a:close()
    assert.are.equal(0, a:wait().code)
    for _ = 1, 20 do P.run({ "sh", "-c", "echo x; echo y >&2; exit 3" }, { stdin = "in" }) end
    local r, msg = P.run({ "drover-no-such-program" }, { stdin = "x" })
    assert.is_nil(r, msg)
    collectgarbage()
    collectgarbage()
    local after = fds_of(me)
    local n0, n1 = 0, 0
    for _ in pairs(before) do n0 = n0 + 1 end
    for _ in pairs(after) do n1 = n1 + 1 end
    local function dump(t) local o = {} for k, v in pairs(t) do o[#o + 1] = k .. " " .. v end table.sort(o) return table.concat(o, "\n") end
    assert.are.equal(n0, n1, "drover's fds before and after differ:\n" .. dump(before) .. "\n--\n" .. dump(after))
  end)

  it("reaps every child: no zombies are left", function()
    for _ = 1, 10 do P.run({ "true" }) end
    local ps = assert(P.spawn({ "sleep", "100" }))
    assert.is_true(ps:kill("KILL"))
    ps:wait()
    -- every process's stat line (pid (comm) state ppid ...), read by a child,
    -- which is then drover's only child; a zombie would have state Z
    local r = P.run({ "sh", "-c", "echo $PPID; cat /proc/[0-9]*/stat 2>/dev/null; true" })
    assert.are.equal(0, r.code, r.stderr)
    local me = r.stdout:match("^(%d+)\n")
    local children = {}
    for line in r.stdout:gmatch("[^\n]+") do
      local pid, state, ppid = line:match("^(%d+) %(.*%) (%a) (%d+)")
      if ppid == me then children[#children + 1] = pid .. " " .. state end
    end
    assert.are.equal(1, #children, table.concat(children, ", "))
    assert.matches("^%d+ [RS]$", children[1])
    assert.is_false(alive(ps.pid))
  end)

  it("looks argv[1] up in the PATH of the child's environment, like execvp", function()
    local bin = tmp .. "/pathbin"
    os.execute("mkdir -p " .. bin)
    write_file(bin .. "/drover-path-test", "#!/bin/sh\necho found \"$0\" \"$@\"\n", "755")
    write_file(bin .. "/drover-noexec-test", "#!/bin/sh\necho never\n", "644")
    local r, msg = P.run({ "drover-path-test" })
    assert.is_nil(r)
    assert.matches("cannot start 'drover%-path%-test': no such file or directory", msg)
    r = assert(P.run({ "drover-path-test", "a" }, { env = { PATH = "/nonexistent:" .. bin .. ":/usr/bin:/bin" } }))
    assert.are.equal("found " .. bin .. "/drover-path-test a\n", r.stdout)
    -- a relative entry is relative to the child's cwd
    r = assert(P.run({ "drover-path-test" }, { cwd = tmp, env = { PATH = "pathbin" } }))
    assert.are.equal("found pathbin/drover-path-test\n", r.stdout)
    -- only the first match counts; a non-executable match means "permission denied"
    r, msg = P.run({ "drover-noexec-test" }, { env = { PATH = bin } })
    assert.is_nil(r)
    assert.matches("cannot start 'drover%-noexec%-test': permission denied", msg)
    -- without PATH, execvp's default /bin:/usr/bin
    r = assert(P.run({ "env" }, { env = { PATH = false } }))
    assert.are.equal(0, r.code)
    assert.is_nil(("\n" .. r.stdout):match("\nPATH="), r.stdout)
  end)

  it("finds a program installed earlier in PATH within a second, and one moved at once", function()
    -- drover remembers where it found a name for a second (engine/src/spawn.c)
    local a, b = tmp .. "/path-a", tmp .. "/path-b"
    os.execute("rm -rf " .. a .. " " .. b .. "; mkdir -p " .. a .. " " .. b)
    write_file(b .. "/drover-moving", "#!/bin/sh\necho b\n", "755")
    local env = { env = { PATH = a .. ":" .. b .. ":/usr/bin:/bin" } }
    local function which() local r, msg = P.run({ "drover-moving" }, env) return r and r.stdout or msg end
    assert.are.equal("b\n", which())
    -- a new one earlier in PATH: found once the second has passed
    write_file(a .. "/drover-moving", "#!/bin/sh\necho a\n", "755")
    H.wait_until(function() return which() == "a\n" end, 30, "the program in the earlier directory")
    -- the one found is removed: the next is found at once, with no waiting
    os.remove(a .. "/drover-moving")
    assert.are.equal("b\n", which())
    -- the one found loses its execute bit: permission denied at once
    os.execute("chmod 644 " .. b .. "/drover-moving")
    assert.matches("cannot start 'drover%-moving': permission denied", which())
    -- another PATH is another lookup
    write_file(a .. "/drover-moving", "#!/bin/sh\necho a2\n", "755")
    local r = assert(P.run({ "drover-moving" }, { env = { PATH = a } }))
    assert.are.equal("a2\n", r.stdout)
  end)

  it("runs an executable file without #! with /bin/sh, like execvp", function()
    local script = tmp .. "/no-shebang"
    write_file(script, "echo \"plain $1 $2\"\n", "755")
    local r = assert(P.run({ script, "x", "y z" }))
    assert.are.equal(0, r.code)
    assert.are.equal("plain x y z\n", r.stdout)
  end)

  it("keeps 200 short processes from 8 tasks apart", function()
    local results = drover.run(function()
      local hs, next_i = {}, 0
      local out = {}
      for w = 1, 8 do
        hs[w] = drover.spawn(function()
          while next_i < 200 do
            next_i = next_i + 1
            local i = next_i
            local opts = { stdin = (i % 3 == 0) and ("in" .. i) or nil }
            out[i] = P.run({ "sh", "-c", "read -r x; echo $1 $x; echo e$1 >&2; exit $(($1 % 7))", "sh", i }, opts)
          end
        end)
      end
      for _, h in ipairs(hs) do h:join() end
      return out
    end)
    for i = 1, 200 do
      local r = results[i]
      assert.are.equal(i % 7, r.code)
      assert.are.equal(i .. ((i % 3 == 0) and (" in" .. i) or "") .. "\n", r.stdout)
      assert.are.equal("e" .. i .. "\n", r.stderr)
    end
  end)
end)

describe("drover.proc argument checking", function()
  local function errs(pattern, f, ...)
    local ok, err = pcall(f, ...)
    assert.is_false(ok)
    assert.matches(pattern, err, 1, true)
  end

  it("names the bad argument or option", function()
    errs("drover.proc.run: bad argument 'argv' (table expected, got nil)", P.run, nil)
    errs("drover.proc.run: bad argument 'argv' (table expected, got string)", P.run, "ls -l")
    errs("drover.proc.spawn: bad argument 'argv' (program name expected in argv[1])", P.spawn, {})
    errs("drover.proc.run: bad argument 'argv[2]' (string expected, got table)", P.run, { "echo", {} })
    errs("drover.proc.run: bad argument 'argv[1]' (contains a NUL byte)", P.run, { "ec\0ho" })
    errs("drover.proc.run: bad argument 'opts' (table expected, got number)", P.run, { "true" }, 5)
    errs("drover.proc.run: unknown option 'tmeout'", P.run, { "true" }, { tmeout = 1 })
    errs("drover.proc.run: bad option 'timeout' (number expected, got string)", P.run, { "true" }, { timeout = "1" })
    errs("drover.proc.run: bad option 'timeout' (must be > 0)", P.run, { "true" }, { timeout = -1 })
    errs("drover.proc.run: bad option 'kill_grace' (must be >= 0)", P.run, { "true" }, { kill_grace = -1 })
    errs("drover.proc.run: bad option 'cwd' (string expected, got boolean)", P.run, { "true" }, { cwd = true })
    errs("drover.proc.run: bad option 'env' (table expected, got string)", P.run, { "true" }, { env = "A=1" })
    errs("drover.proc.run: bad option 'env' (value of 'A': string, number or false expected, got table)",
      P.run, { "true" }, { env = { A = {} } })
    errs("drover.proc.run: bad option 'env' (invalid variable name 'A=B')", P.run, { "true" }, { env = { ["A=B"] = "1" } })
    errs("drover.proc.run: bad option 'clear_env' (boolean expected, got number)", P.run, { "true" }, { clear_env = 1 })
    errs("drover.proc.run: bad option 'detach' (boolean expected, got string)", P.run, { "true" }, { detach = "yes" })
    errs("drover.proc.run: bad option 'stdin' (string or boolean expected, got table)", P.run, { "cat" }, { stdin = {} })
    errs("drover.proc.run: bad option 'stdin' (true needs drover.proc.spawn", P.run, { "cat" }, { stdin = true })
    errs("drover.proc.run: bad option 'stdout' (\"capture\", \"inherit\", \"null\", a file path or a function expected, got number)",
      P.run, { "true" }, { stdout = 1 })
    errs("drover.proc.spawn: bad option 'stderr' (empty file path)", P.spawn, { "true" }, { stderr = "" })
    local p = assert(P.spawn({ "true" }))
    errs("proc:wait: bad argument 'timeout' (number expected, got string)", p.wait, p, "1")
    errs("proc:wait: bad argument 'self' (process expected, got table)", p.wait, {})
    errs("proc:kill: bad argument 'signal' (unknown signal 'NOPE')", p.kill, p, "NOPE")
    errs("proc:kill: bad argument 'signal' (signal name or number expected, got table)", p.kill, p, {})
    errs("proc:kill: bad argument 'signal' (unknown signal '999')", p.kill, p, 999)
    errs("proc:write: bad argument 'data' (string expected, got number)", p.write, p, 5)
    assert.are.equal(0, p:wait().code)
  end)
end)

describe("drover.proc.output", function()
  it("returns stdout on success, nil and a message otherwise", function()
    assert.are.equal("hi\n", P.output({ "echo", "hi" }))
    local out, msg, r = P.output({ "sh", "-c", "echo some detail >&2; exit 4" })
    assert.is_nil(out)
    assert.are.equal("'sh' exited with code 4: some detail", msg)
    assert.are.equal(4, r.code)
    out, msg = P.output({ "drover-no-such-program" })
    assert.is_nil(out)
    assert.matches("cannot start", msg)
  end)
end)

describe("drover.proc through the drover binary", function()
  local function script(name, code)
    local path = tmp .. "/" .. name
    write_file(path, code)
    return path
  end

  it("runs processes from a script, and inherits stdio", function()
    local path = script("inherit.lua", [[
      local drover = require "drover"
      local r = drover.proc.run({ "sh", "-c", "echo to-parent; echo to-parent-err >&2" },
        { stdout = "inherit", stderr = "inherit" })
      assert(r.stdout == nil and r.code == 0)
      drover.proc.run({ "echo", "dropped" }, { stdout = "null" })
      drover.run(function()
        local r2 = drover.proc.run({ "echo", "from-task" })
        io.write("captured:", r2.stdout)
      end)
    ]])
    local code, out, err = H.drover({ path })
    assert.are.equal(0, code, err)
    assert.are.equal("to-parent\ncaptured:from-task\n", out)
    assert.are.equal("to-parent-err\n", err)
  end)

  it("kills the groups of running children when the engine closes", function()
    local marker = tmp .. "/close-gc"
    os.remove(marker)
    local path = script("close.lua", string.format([[
      local drover = require "drover"
      local p = drover.proc.spawn({ "sh", "-c", "sleep 100 & echo $! > %s; sleep 100" })
      drover.proc.spawn({ "sleep", "100" }, { stdout = "null" }) -- handle dropped at once
      while not (io.open(%q) or {read = function() end}):read("l") do drover.sleep(0.02) end
      print(p.pid)
    ]], marker, marker))
    local code, out, err = H.drover({ path })
    assert.are.equal(0, code, err)
    local pid = tonumber(out:match("%d+"))
    local grandchild = tonumber(read_file(marker):match("%d+"))
    -- the leader was killed and reaped before drover exited
    assert.is_false(alive(pid))
    H.wait_until(function() return not alive(grandchild) end, 30, "the grandchild to die")
  end)

  it("looks programs up in its own PATH, and runs files without #! with /bin/sh", function()
    -- a child drover whose own PATH (not one given in env) has our
    -- directory: the search drover makes for its own environment
    local bin = tmp .. "/ownpath"
    os.execute("mkdir -p " .. bin)
    write_file(bin .. "/drover-own-plain", "echo \"plain $1\"\n", "755")
    write_file(bin .. "/drover-own-script", "#!/bin/sh\necho \"script $1\"\n", "755")
    write_file(bin .. "/drover-own-noexec", "#!/bin/sh\necho never\n", "644")
    local path = script("ownpath.lua", [[
      local drover = require "drover"
      local P = drover.proc
      io.write(assert(P.run({ "drover-own-plain", "a" })).stdout)
      io.write(assert(P.run({ "drover-own-script", "b" })).stdout)
      local r, msg = P.run({ "drover-own-noexec" })
      io.write(tostring(r), " ", msg, "\n")
      r, msg = P.run({ "drover-own-missing" })
      io.write(tostring(r), " ", msg, "\n")
    ]])
    local code, out, err = H.drover({ path }, { env = { PATH = bin .. ":" .. os.getenv("PATH") } })
    assert.are.equal(0, code, err)
    assert.are.equal("plain a\nscript b\n"
      .. "nil drover.proc.run: cannot start 'drover-own-noexec': permission denied\n"
      .. "nil drover.proc.run: cannot start 'drover-own-missing': no such file or directory\n", out)
  end)

  it("starts children right from a drover started with its stdio closed", function()
    -- drover fills fds 0-2 with /dev/null first (libuv aborted closing its
    -- loop's epoll fd, opened as fd 0), so a child inheriting stdout gets
    -- /dev/null, not one of drover's files
    local out = tmp .. "/closed-stdio.out"
    os.remove(out)
    local path = script("closed_stdio.lua", string.format([[
      local drover = require "drover"
      local P = drover.proc
      local f = assert(io.open(%q, "w"))
      local r = assert(P.run({ "sh", "-c", "cat; echo out; echo err >&2" }, { stdin = "in " }))
      f:write(r.code, " ", r.stdout, r.stderr)
      r = assert(P.run({ "sh", "-c", "readlink /proc/self/fd/0; echo x >&2" }, { stderr = "null" }))
      f:write(r.stdout)
      r = assert(P.run({ "sh", "-c", "readlink /proc/self/fd/3 3>&1 >&2" }, { stdout = "inherit" }))
      f:write(r.stderr)
      f:close()
    ]], out))
    local r = assert(P.run({ "sh", "-c", 'exec "$0" "$1" <&- >&- 2>&-', H.drover_bin, path }))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("0 in out\nerr\n/dev/null\n/dev/null\n", read_file(out))
  end)

  it("takes the pidfd from the clone, or opens it after where the kernel says no", function()
    -- DROVER_SPAWN=pidfd_open starts drover as if clone() had refused
    -- CLONE_PIDFD (a kernel before 5.2, a seccomp filter): strace shows
    -- which way each child's pidfd came.  The child drover's DROVER_SPAWN
    -- is set here, so the case holds in the uv_spawn run of this file too.
    local path = script("pidfd_way.lua", [[
      local P = require("drover").proc
      for i = 1, 3 do assert(P.run({ "true" }).code == 0, "run " .. i) end
      local r, msg = P.run({ "drover-no-such-program" })
      assert(r == nil and msg:match("no such file"), msg)
      r = assert(P.run({ "sh", "-c", "exit 7" }))
      assert(r.code == 7)
    ]])
    local function trace(mode)
      local log = tmp .. "/strace-" .. (mode or "default")
      local r = assert(P.run({ "strace", "-f", "-e", "trace=clone,clone3,pidfd_open", "-o", log, H.drover_bin, path },
        { env = { DROVER_SPAWN = mode or false } }))
      assert.are.equal(0, r.code, r.stderr)
      local t = read_file(log)
      local with, without, opens = 0, 0, 0
      for line in t:gmatch("[^\n]+") do
        if line:match("clone%(") and line:match("CLONE_VFORK") then
          if line:match("CLONE_PIDFD") then with = with + 1 else without = without + 1 end
        elseif line:match("pidfd_open%(") and not line:match("resumed") then
          opens = opens + 1
        end
      end
      return with, without, opens, t
    end
    -- 4 children (the missing program is never cloned); the one
    -- pidfd_open of drover's own pid is the start-up probe
    local with, without, opens, t = trace(nil)
    assert.are.same({ 4, 0, 1 }, { with, without, opens }, t)
    with, without, opens, t = trace("pidfd_open")
    assert.are.same({ 0, 4, 5 }, { with, without, opens }, t)
  end)

  it("lets detached children outlive the engine", function()
    local path = script("detach.lua", [[
      local drover = require "drover"
      local p = drover.proc.spawn({ "sleep", "100" }, { detach = true })
      print(p.pid)
    ]])
    local code, out, err = H.drover({ path })
    assert.are.equal(0, code, err)
    local pid = tonumber(out:match("%d+"))
    assert.is_true(alive(pid))
    os.execute("kill -KILL -" .. pid .. " 2>/dev/null")
    H.wait_until(function() return not alive(pid) end, 30, "the detached child to die")
  end)
end)
