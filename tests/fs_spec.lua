-- drover.fs against the real filesystem, in temporary directories; checked
-- with coreutils (stat, sha256sum), GNU tar and Python's tarfile.
local drover = require "drover"
local fs = require "drover.fs"

--- Run a shell command (test scaffolding only); returns stdout, exit ok.
local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1", "r")
  local out = p:read("a")
  local ok = p:close()
  return out, ok
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function octal(s) return tonumber(s, 8) end

local function umask()
  return octal((sh("umask"):match("%d+")))
end

-- Debian's interpreter when present: a pyenv shim costs a second per start.
local PYTHON = io.open("/usr/bin/python3") and "/usr/bin/python3" or "python3"

--- Build a tar archive with Python's tarfile.  `members` is Python code
-- run with `tar` (an open TarFile), `tarfile`, `io`, `add(name, data)` and
-- `info(name, **attrs)` in scope.
local function pytar(path, members, fmt)
  local script = path .. ".py"
  assert(fs.write(script, ([[
import io, sys, tarfile
def info(name, **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items(): setattr(ti, k, v)
    return ti
with tarfile.open(sys.argv[1], "w", format=tarfile.%s) as tar:
    def add(name, data, **kw):
        ti = info(name, size=len(data), **kw)
        tar.addfile(ti, io.BytesIO(data))
%s
]]):format(fmt or "PAX_FORMAT", members:gsub("\n", "\n    "):gsub("^", "    "))))
  local out, ok = sh(PYTHON .. " " .. q(script) .. " " .. q(path))
  assert(ok, out)
  fs.remove(script)
end

describe("drover.fs", function()
  local dir

  before_each(function()
    dir = assert(fs.tempdir("drover-fs-spec-"))
  end)

  after_each(function()
    if dir then assert(fs.remove(dir, { recursive = true })) end
  end)

  describe("read, write, append", function()
    it("round-trips binary data, including NUL bytes and large files", function()
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local small = table.concat(bytes)
      local big = string.rep(small, 4096 * 2) -- 2 MiB
      assert.is_true(fs.write(dir .. "/small", small))
      assert.is_true(fs.write(dir .. "/big", big))
      assert.are.equal(small, fs.read(dir .. "/small"))
      assert.are.equal(big, fs.read(dir .. "/big"))
      assert.are.equal(#big, tonumber((sh("stat -c %s " .. q(dir .. "/big")))))
      assert.is_true(fs.write(dir .. "/empty", ""))
      assert.are.equal("", fs.read(dir .. "/empty"))
    end)

    it("reads pseudo-files whose size is not known in advance", function()
      local s = assert(fs.read("/proc/self/status"))
      assert.matches("Pid:", s)
    end)

    it("reports a missing file io-style, naming the path", function()
      local v, msg, code = fs.read(dir .. "/nope")
      assert.is_nil(v)
      assert.are.equal("drover.fs.read: " .. dir .. "/nope: No such file or directory", msg)
      assert.are.equal(2, code) -- ENOENT
      v, msg = fs.read(dir)
      assert.is_nil(v)
      assert.are.equal("drover.fs.read: " .. dir .. ": Is a directory", msg)
    end)

    it("write replaces the file and leaves no temporary file behind", function()
      local p = dir .. "/f.txt"
      assert(fs.write(p, "one"))
      assert(fs.write(p, "two"))
      assert.are.equal("two", fs.read(p))
      assert.are.same({ "f.txt" }, fs.list(dir))
    end)

    it("write gives new files 0666 & ~umask and keeps the mode of a replaced file", function()
      local p = dir .. "/m"
      assert(fs.write(p, "x"))
      assert.are.equal(octal("666") & ~umask(), fs.stat(p).mode)
      assert(fs.write(p, "y", { mode = "600" }))
      assert.are.equal(octal("600"), fs.stat(p).mode)
      assert(fs.write(p, "z"))
      assert.are.equal(octal("600"), fs.stat(p).mode)
      assert(fs.write(p, "w", { mode = octal("751") }))
      assert.are.equal("751", (sh("stat -c %a " .. q(p)):gsub("%s", "")))
    end)

    it("write into a missing directory fails cleanly", function()
      local v, msg = fs.write(dir .. "/no/such/f", "x")
      assert.is_nil(v)
      assert.are.equal("drover.fs.write: " .. dir .. "/no/such/f: No such file or directory", msg)
      assert.are.same({}, fs.list(dir))
    end)

    it("write replaces a symbolic link instead of writing through it", function()
      assert(fs.write(dir .. "/target", "keep"))
      assert(sh("ln -s target " .. q(dir .. "/link")))
      assert(fs.write(dir .. "/link", "new"))
      assert.are.equal("keep", fs.read(dir .. "/target"))
      assert.are.equal("file", fs.stat(dir .. "/link").type)
    end)

    it("a concurrent reader sees the old or the new contents, never a mix", function()
      local H = require "helper"
      local p, ready, stop = dir .. "/swap", dir .. "/ready", dir .. "/stop"
      local a, b = string.rep("a", 65536), string.rep("b", 65536)
      assert(fs.write(p, a))
      -- One awk process re-reads the file until told to stop and reports
      -- every read that is not a whole 64 KiB of one letter.
      local reader = io.popen(("awk -v f=%s -v ready=%s -v stop=%s 'BEGIN {"
        .. " printf \"\" > ready; close(ready);"
        .. " while (1) { line = \"\"; getline line < f; close(f); reads++;"
        .. "   if (length(line) != 65536 || !(line ~ /^a+$/ || line ~ /^b+$/)) { bad++; print \"partial \" length(line) }"
        .. "   if ((getline x < stop) > 0) break; close(stop) }"
        .. " print \"reads \" reads \" bad \" bad + 0 }'"):format(q(p), q(ready), q(stop)), "r")
      H.wait_until(function() return fs.exists(ready) end, 30, "the reader to start")
      for i = 1, 200 do assert(fs.write(p, i % 2 == 0 and a or b)) end
      assert(fs.write(stop, "stop\n"))
      local out = reader:read("a")
      reader:close()
      local reads, bad = out:match("reads (%d+) bad (%d+)")
      assert.is_truthy(reads, out)
      assert.is_true(tonumber(reads) > 0)
      assert.are.equal("0", bad, out)
    end)

    it("append creates the file, then appends", function()
      local p = dir .. "/log"
      assert.is_true(fs.append(p, "one\n"))
      assert.is_true(fs.append(p, "two\n"))
      assert.are.equal("one\ntwo\n", fs.read(p))
      local v, msg = fs.append(dir .. "/no/log", "x")
      assert.is_nil(v)
      assert.matches("^drover.fs.append: .*/no/log: No such file or directory$", msg)
    end)
  end)

  describe("metadata", function()
    it("exists follows links: a dangling link does not exist", function()
      assert(fs.write(dir .. "/f", "x"))
      assert(sh("ln -s f " .. q(dir .. "/good") .. " && ln -s missing " .. q(dir .. "/dangling")))
      assert.is_true(fs.exists(dir .. "/f"))
      assert.is_true(fs.exists(dir))
      assert.is_true(fs.exists(dir .. "/good"))
      assert.is_false(fs.exists(dir .. "/dangling"))
      assert.is_false(fs.exists(dir .. "/missing"))
    end)

    it("stat describes files, directories and links like stat(1)", function()
      local p = dir .. "/f"
      assert(fs.write(p, "hello", { mode = "640" }))
      local st = fs.stat(p)
      assert.are.equal("file", st.type)
      assert.are.equal(5, st.size)
      assert.are.equal(octal("640"), st.mode)
      assert.are.equal(tonumber((sh("stat -c %Y " .. q(p)))), math.floor(st.mtime))
      assert.are.equal("directory", fs.stat(dir).type)
      assert(sh("ln -s f " .. q(dir .. "/l")))
      local l = fs.stat(dir .. "/l")
      assert.are.equal("link", l.type)
      assert.are.equal(1, l.size) -- the length of the target "f"
      assert.are.equal("fifo", (function()
        assert(sh("mkfifo " .. q(dir .. "/pipe")))
        return fs.stat(dir .. "/pipe").type
      end)())
      local v, msg, code = fs.stat(dir .. "/missing")
      assert.is_nil(v)
      assert.are.equal("drover.fs.stat: " .. dir .. "/missing: No such file or directory", msg)
      assert.are.equal(2, code)
    end)
  end)

  describe("directories", function()
    it("mkdir creates parents, takes a mode, accepts an existing directory", function()
      local p = dir .. "/a/b/c"
      assert.is_true(fs.mkdir(p, "750"))
      assert.are.equal("directory", fs.stat(p).type)
      assert.are.equal(octal("750") & ~umask(), fs.stat(p).mode)
      assert.is_true(fs.mkdir(p))
      assert.is_true(fs.mkdir(dir .. "/d", octal("700")))
      assert.are.equal(octal("700"), fs.stat(dir .. "/d").mode)
    end)

    it("mkdir over a file fails with the path", function()
      assert(fs.write(dir .. "/f", ""))
      local v, msg = fs.mkdir(dir .. "/f")
      assert.is_nil(v)
      assert.are.equal("drover.fs.mkdir: " .. dir .. "/f: File exists", msg)
      v, msg = fs.mkdir(dir .. "/f/sub")
      assert.is_nil(v)
      assert.are.equal("drover.fs.mkdir: " .. dir .. "/f/sub: Not a directory", msg)
    end)

    it("list returns sorted names without . and ..", function()
      for _, n in ipairs { "b", "a", "C", "a.txt", "a-b" } do assert(fs.write(dir .. "/" .. n, "")) end
      assert(fs.mkdir(dir .. "/sub"))
      assert.are.same({ "C", "a", "a-b", "a.txt", "b", "sub" }, fs.list(dir))
      assert.are.same({}, fs.list(dir .. "/sub"))
      local v, msg = fs.list(dir .. "/a")
      assert.is_nil(v)
      assert.are.equal("drover.fs.list: " .. dir .. "/a: Not a directory", msg)
    end)

    it("walk lists files beneath, sorted, relative; dirs=true adds directories", function()
      assert(fs.mkdir(dir .. "/t/x/y"))
      assert(fs.mkdir(dir .. "/t/empty"))
      for _, n in ipairs { "t/b", "t/a", "t/x/1", "t/x/y/deep", "t/x-z" } do
        assert(fs.write(dir .. "/" .. n, n))
      end
      assert.are.same({ "a", "b", "x-z", "x/1", "x/y/deep" }, fs.walk(dir .. "/t"))
      assert.are.same({ "a", "b", "empty", "x", "x-z", "x/1", "x/y", "x/y/deep" },
        fs.walk(dir .. "/t", { dirs = true }))
      local v, msg = fs.walk(dir .. "/none")
      assert.is_nil(v)
      assert.matches("^drover.fs.walk: .*/none: No such file or directory$", msg)
    end)

    it("walk lists links without following them (no loops)", function()
      assert(fs.mkdir(dir .. "/t/sub"))
      assert(fs.write(dir .. "/t/sub/f", ""))
      assert(sh("ln -s .. " .. q(dir .. "/t/sub/up") .. " && ln -s / " .. q(dir .. "/t/root")))
      assert.are.same({ "root", "sub/f", "sub/up" }, fs.walk(dir .. "/t"))
    end)

    it("remove deletes files, links and empty directories", function()
      assert(fs.write(dir .. "/f", ""))
      assert(fs.mkdir(dir .. "/d"))
      assert.is_true(fs.remove(dir .. "/f"))
      assert.is_true(fs.remove(dir .. "/d"))
      assert.are.same({}, fs.list(dir))
      local v, msg = fs.remove(dir .. "/f")
      assert.is_nil(v)
      assert.are.equal("drover.fs.remove: " .. dir .. "/f: No such file or directory", msg)
    end)

    it("remove refuses a non-empty directory unless recursive", function()
      assert(fs.mkdir(dir .. "/d/e/f"))
      assert(fs.write(dir .. "/d/e/f/x", ""))
      local v, msg = fs.remove(dir .. "/d")
      assert.is_nil(v)
      assert.are.equal("drover.fs.remove: " .. dir .. "/d: Directory not empty", msg)
      assert.is_true(fs.remove(dir .. "/d", { recursive = true }))
      assert.is_false(fs.exists(dir .. "/d"))
    end)

    it("recursive remove deletes links, not what they point to", function()
      local outside = assert(fs.tempdir("drover-fs-outside-"))
      finally(function() fs.remove(outside, { recursive = true }) end)
      assert(fs.write(outside .. "/precious", "keep me"))
      assert(fs.mkdir(dir .. "/tree/sub"))
      assert(sh(("ln -s %s %s && ln -s %s %s"):format(q(outside), q(dir .. "/tree/sub/dirlink"),
        q(outside .. "/precious"), q(dir .. "/tree/filelink"))))
      assert.is_true(fs.remove(dir .. "/tree", { recursive = true }))
      assert.is_false(fs.exists(dir .. "/tree"))
      assert.are.equal("keep me", fs.read(outside .. "/precious"))
      -- a link given directly is removed as a link too
      assert(sh(("ln -s %s %s"):format(q(outside), q(dir .. "/l"))))
      assert.is_true(fs.remove(dir .. "/l", { recursive = true }))
      assert.are.equal("keep me", fs.read(outside .. "/precious"))
    end)

    it("tempdir makes distinct private directories, with a prefix", function()
      local a = assert(fs.tempdir())
      local b = assert(fs.tempdir("drover-fs-spec-x-"))
      local c = assert(fs.tempdir(dir .. "/own-"))
      finally(function() fs.remove(a); fs.remove(b) end)
      assert.are_not.equal(a, b)
      assert.matches("^/.*/drover%-fs%-spec%-x%-%w+$", b)
      assert.are.equal(dir .. "/own-", c:sub(1, #dir + 5))
      for _, d in ipairs { a, b, c } do
        assert.are.equal("directory", fs.stat(d).type)
        assert.are.equal(octal("700"), fs.stat(d).mode)
      end
      local v, msg = fs.tempdir(dir .. "/missing/x-")
      assert.is_nil(v)
      assert.matches("^drover.fs.tempdir: .*/missing/x%-XXXXXX: No such file or directory$", msg)
    end)
  end)

  describe("copy and rename", function()
    it("copy copies contents and permission bits", function()
      local data = string.rep("0123456789", 100000)
      assert(fs.write(dir .. "/src", data, { mode = "750" }))
      assert.is_true(fs.copy(dir .. "/src", dir .. "/dst"))
      assert.are.equal(data, fs.read(dir .. "/dst"))
      assert.are.equal(octal("750"), fs.stat(dir .. "/dst").mode)
      -- over an existing file, with another mode
      assert(fs.write(dir .. "/src2", "short", { mode = "600" }))
      assert.is_true(fs.copy(dir .. "/src2", dir .. "/dst"))
      assert.are.equal("short", fs.read(dir .. "/dst"))
      assert.are.equal(octal("600"), fs.stat(dir .. "/dst").mode)
      assert(fs.write(dir .. "/empty", ""))
      assert.is_true(fs.copy(dir .. "/empty", dir .. "/empty2"))
      assert.are.equal("", fs.read(dir .. "/empty2"))
    end)

    it("copy reports the failing path", function()
      local v, msg = fs.copy(dir .. "/none", dir .. "/x")
      assert.is_nil(v)
      assert.are.equal("drover.fs.copy: " .. dir .. "/none: No such file or directory", msg)
      v, msg = fs.copy(dir, dir .. "/x")
      assert.is_nil(v)
      assert.are.equal("drover.fs.copy: " .. dir .. ": Is a directory", msg)
      assert(fs.write(dir .. "/f", "x"))
      v, msg = fs.copy(dir .. "/f", dir .. "/no/such")
      assert.is_nil(v)
      assert.are.equal("drover.fs.copy: " .. dir .. "/no/such: No such file or directory", msg)
      assert.are.same({ "f" }, fs.list(dir))
    end)

    it("rename moves, and names both paths on failure", function()
      assert(fs.write(dir .. "/a", "x"))
      assert.is_true(fs.rename(dir .. "/a", dir .. "/b"))
      assert.is_false(fs.exists(dir .. "/a"))
      assert.are.equal("x", fs.read(dir .. "/b"))
      local v, msg = fs.rename(dir .. "/a", dir .. "/c")
      assert.is_nil(v)
      assert.are.equal(("drover.fs.rename: %s/a -> %s/c: No such file or directory"):format(dir, dir), msg)
    end)
  end)

  describe("sha256", function()
    it("matches sha256sum for files", function()
      local contents = { "", "abc", string.rep("x", 1000003) }
      local bytes = {}
      for i = 1, 100000 do bytes[i] = string.char((i * 7919) % 256) end
      contents[#contents + 1] = table.concat(bytes)
      for i, c in ipairs(contents) do
        local p = dir .. "/f" .. i
        assert(fs.write(p, c))
        local want = sh("sha256sum " .. q(p)):match("^(%x+)")
        assert.are.equal(64, #want)
        assert.are.equal(want, fs.sha256(p))
        assert.are.equal(want, fs.sha256_string(c))
      end
      assert.are.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        fs.sha256_string("abc"))
    end)

    it("reports unreadable paths", function()
      local v, msg = fs.sha256(dir .. "/none")
      assert.is_nil(v)
      assert.are.equal("drover.fs.sha256: " .. dir .. "/none: No such file or directory", msg)
      v, msg = fs.sha256(dir)
      assert.is_nil(v)
      assert.are.equal("drover.fs.sha256: " .. dir .. ": Is a directory", msg)
    end)
  end)

  describe("argument errors raise, naming function and argument", function()
    local cases = {
      { function() fs.read(nil) end, "drover.fs.read: bad argument 'path' (string expected, got nil)" },
      { function() fs.read(42) end, "drover.fs.read: bad argument 'path' (string expected, got number)" },
      { function() fs.read("a\0b") end, "drover.fs.read: bad argument 'path' (contains a NUL byte)" },
      { function() fs.write("/tmp/x", nil) end, "drover.fs.write: bad argument 'data' (string expected, got nil)" },
      { function() fs.write("/tmp/x", "d", { mode = "9" }) end, "drover.fs.write: bad argument 'opts.mode' (octal mode like \"755\" expected, got \"9\")" },
      { function() fs.write("/tmp/x", "d", "600") end, "drover.fs.write: bad argument 'opts' (table or nil expected, got string)" },
      { function() fs.append({}, "d") end, "drover.fs.append: bad argument 'path' (string expected, got table)" },
      { function() fs.mkdir("/tmp/x", true) end, "drover.fs.mkdir: bad argument 'mode' (integer or octal string expected, got boolean)" },
      { function() fs.mkdir("/tmp/x", 99999) end, "drover.fs.mkdir: bad argument 'mode' (mode out of range 0..07777)" },
      { function() fs.remove("/tmp/x", { recursive = "yes" }) end, "drover.fs.remove: bad option 'recursive' (boolean expected, got string)" },
      { function() fs.list() end, "drover.fs.list: bad argument 'dir' (string expected, got no value)" },
      { function() fs.walk("/tmp", 1) end, "drover.fs.walk: bad argument 'opts' (table or nil expected, got number)" },
      { function() fs.copy("/a", nil) end, "drover.fs.copy: bad argument 'dst' (string expected, got nil)" },
      { function() fs.rename(nil, "/b") end, "drover.fs.rename: bad argument 'from' (string expected, got nil)" },
      { function() fs.tempdir(7) end, "drover.fs.tempdir: bad argument 'prefix' (string expected, got number)" },
      { function() fs.sha256_string(nil) end, "drover.fs.sha256_string: bad argument 'data' (string expected, got nil)" },
      { function() fs.exists(false) end, "drover.fs.exists: bad argument 'path' (string expected, got boolean)" },
      { function() fs.stat() end, "drover.fs.stat: bad argument 'path' (string expected, got no value)" },
      { function() fs.tar("/tmp/x.tar", "a") end, "drover.fs.tar: bad argument 'entries' (table expected, got string)" },
      { function() fs.untar("/tmp/x.tar") end, "drover.fs.untar: bad argument 'dest_dir' (string expected, got no value)" },
      { function() fs.join("a", 1) end, "drover.fs.join: bad argument #2 (string expected, got number)" },
    }
    for i, c in ipairs(cases) do
      it("case " .. i .. ": " .. c[2]:match("^(%S+)"), function()
        local ok, err = pcall(c[1])
        assert.is_false(ok)
        -- raised like Lua's own argument errors: at the caller's line
        assert.are.equal("tests/fs_spec.lua:", err:match("^(.-:)%d+: "))
        assert.are.equal(c[2], (err:gsub("^.-:%d+: ", "")))
      end)
    end
  end)

  describe("path helpers", function()
    it("join, dirname, basename", function()
      assert.are.equal("a/b/c", fs.join("a/", "/b", "c"))
      assert.are.equal("/x/y", fs.join("/x", "y/"))
      assert.are.equal("/y", fs.join("/", "y"))
      assert.are.equal("a", fs.join("a", ""))
      assert.are.equal("a/b", fs.dirname("a/b/c"))
      assert.are.equal(".", fs.dirname("c"))
      assert.are.equal("/", fs.dirname("/c"))
      assert.are.equal("/", fs.dirname("/"))
      assert.are.equal("a", fs.dirname("a//b/"))
      assert.are.equal("c.txt", fs.basename("a/b/c.txt"))
      assert.are.equal("b", fs.basename("a/b/"))
      assert.are.equal("/", fs.basename("/"))
    end)
  end)

  it("works inside tasks as well as outside", function()
    local got = drover.run(function()
      local hs = {}
      for i = 1, 5 do
        hs[i] = drover.spawn(function()
          local p = dir .. "/task" .. i
          assert(fs.write(p, "task " .. i))
          drover.sleep(0.001)
          return fs.read(p), fs.sha256(p)
        end)
      end
      local out = {}
      for i, h in ipairs(hs) do
        local data, sum = h:join()
        out[i] = data
        assert.are.equal(fs.sha256_string(data), sum)
      end
      return out
    end)
    assert.are.same({ "task 1", "task 2", "task 3", "task 4", "task 5" }, got)
  end)

  -----------------------------------------------------------------------------
  describe("tar", function()
    local function tree(base)
      assert(fs.mkdir(base .. "/bin"))
      assert(fs.write(base .. "/bin/run", "#!/bin/sh\necho hi\n", { mode = "700" }))
      assert(fs.write(base .. "/README", "read me\n", { mode = "600" }))
      assert(fs.write(base .. "/empty", ""))
      assert(fs.write(base .. "/block", string.rep("z", 512)))
    end

    local function entries(base)
      return {
        { name = "pkg/README", path = base .. "/README" },
        { name = "pkg/bin/run", path = base .. "/bin/run" },
        { name = "pkg/bin", type = "directory" },
        { name = "pkg", type = "directory" },
        { name = "pkg/empty", path = base .. "/empty" },
        { name = "pkg/block", path = base .. "/block" },
        { name = "pkg/VERSION", data = "1.2.3\n" },
        { name = "./pkg/bin/tool", data = "#!/bin/sh\n", mode = "755" },
      }
    end

    it("is reproducible: same inputs, same bytes, whatever the order and file times", function()
      tree(dir .. "/src")
      local e = entries(dir .. "/src")
      assert.is_true(fs.tar(dir .. "/one.tar", e))
      -- reversed entry order, newer source mtimes
      local r = {}
      for i = #e, 1, -1 do r[#r + 1] = e[i] end
      assert(sh("touch -d '2020-02-02' " .. q(dir .. "/src/README") .. " " .. q(dir .. "/src/bin/run")))
      assert.is_true(fs.tar(dir .. "/two.tar", r))
      assert.are.equal(fs.read(dir .. "/one.tar"), fs.read(dir .. "/two.tar"))
      assert.are.equal(0, fs.stat(dir .. "/one.tar").size % 10240)
      assert.is_true(fs.tar(dir .. "/three.tar", e, { mtime = 1700000000 }))
      assert.are_not.equal(fs.sha256(dir .. "/one.tar"), fs.sha256(dir .. "/three.tar"))
    end)

    it("is listed correctly by GNU tar: sorted, root-owned, normalised modes, fixed time", function()
      tree(dir .. "/src")
      assert(fs.tar(dir .. "/a.tar", entries(dir .. "/src"), { mtime = 1700000000 }))
      local out, ok = sh("TZ=UTC tar --numeric-owner -tvf " .. q(dir .. "/a.tar"))
      assert(ok, out)
      local want = {
        "drwxr-xr-x 0/0 0 2023-11-14 22:13 pkg/",
        "-rw-r--r-- 0/0 8 2023-11-14 22:13 pkg/README",
        "-rw-r--r-- 0/0 6 2023-11-14 22:13 pkg/VERSION",
        "drwxr-xr-x 0/0 0 2023-11-14 22:13 pkg/bin/",
        "-rwxr-xr-x 0/0 18 2023-11-14 22:13 pkg/bin/run",
        "-rwxr-xr-x 0/0 10 2023-11-14 22:13 pkg/bin/tool",
        "-rw-r--r-- 0/0 512 2023-11-14 22:13 pkg/block",
        "-rw-r--r-- 0/0 0 2023-11-14 22:13 pkg/empty",
      }
      local got = {}
      for line in out:gmatch("[^\n]+") do got[#got + 1] = (line:gsub("%s+", " ")) end
      assert.are.same(want, got)
      -- GNU tar's own verdict on the format
      out = sh("tar --test-label -f " .. q(dir .. "/a.tar") .. "; od -An -c -j257 -N8 " .. q(dir .. "/a.tar"))
      assert.matches("u%s+s%s+t%s+a%s+r%s+\\0%s+0%s+0", out)
    end)

    it("is extracted by GNU tar to identical contents", function()
      tree(dir .. "/src")
      assert(fs.tar(dir .. "/a.tar", entries(dir .. "/src")))
      assert(fs.mkdir(dir .. "/x"))
      local out, ok = sh("tar -xf " .. q(dir .. "/a.tar") .. " -C " .. q(dir .. "/x"))
      assert(ok, out)
      for _, pair in ipairs {
        { "pkg/README", "src/README" }, { "pkg/bin/run", "src/bin/run" },
        { "pkg/empty", "src/empty" }, { "pkg/block", "src/block" },
      } do
        assert.are.equal(fs.sha256(dir .. "/src/" .. pair[2]:sub(5)), fs.sha256(dir .. "/x/" .. pair[1]))
      end
      assert.are.equal("1.2.3\n", fs.read(dir .. "/x/pkg/VERSION"))
      assert.are.equal(octal("755"), fs.stat(dir .. "/x/pkg/bin/run").mode)
      assert.are.equal(octal("644"), fs.stat(dir .. "/x/pkg/README").mode)
    end)

    it("stores long names in the ustar prefix field", function()
      local long = string.rep("d", 60) .. "/" .. string.rep("e", 80) .. "/" .. string.rep("f", 99)
      assert.are.equal(241, #long)
      assert.is_true(fs.tar(dir .. "/l.tar", {
        { name = long, data = "deep" },
        { name = string.rep("g", 100), data = "exactly 100" },
      }))
      local out = sh("tar -tf " .. q(dir .. "/l.tar"))
      assert.are.equal(long .. "\n" .. string.rep("g", 100) .. "\n", out) -- sorted: d < g
      assert(fs.mkdir(dir .. "/x"))
      assert(sh("tar -xf " .. q(dir .. "/l.tar") .. " -C " .. q(dir .. "/x")))
      assert.are.equal("deep", fs.read(dir .. "/x/" .. long))
      -- and no GNU or pax extension records were needed
      assert.is_nil(fs.read(dir .. "/l.tar"):find("././@LongLink", 1, true))
      assert.is_nil(fs.read(dir .. "/l.tar"):find("PaxHeader", 1, true))
    end)

    it("refuses names ustar cannot represent, with a clear error", function()
      local cases = {
        { string.rep("a", 101), "cannot be stored in a ustar header" },
        { string.rep("a", 156) .. "/b", "cannot be stored in a ustar header" },
        { "a/" .. string.rep("b", 101), "cannot be stored in a ustar header" },
        { "/etc/passwd", "absolute name" },
        { "a/../../b", "'..'" },
        { "./", "empty name" },
        { "a\0b", "NUL" },
      }
      for _, c in ipairs(cases) do
        local ok, err = pcall(fs.tar, dir .. "/bad.tar", { { name = c[1], data = "" } })
        assert.is_false(ok)
        assert.matches("^drover.fs.tar: bad argument 'entries%[1%]%.name' %(", err)
        assert.is_truthy(err:find(c[2], 1, true), err)
      end
      assert.are.same({}, fs.list(dir))
    end)

    it("checks entries before creating the archive", function()
      local cases = {
        { { "x" }, "bad argument 'entries[1]' (table expected, got string)" },
        { { {} }, "bad argument 'entries[1].name' (string expected, got nil)" },
        { { { name = "a" } }, "a file needs exactly one of 'path' or 'data'" },
        { { { name = "a", data = "", path = "/etc/hostname" } }, "a file needs exactly one of 'path' or 'data'" },
        { { { name = "a", type = "directory", data = "" } }, "a directory takes neither" },
        { { { name = "a", type = "link" } }, "bad argument 'entries[1].type'" },
        { { { name = "a", data = 5 } }, "bad argument 'entries[1].data' (string expected, got number)" },
        { { { name = "a", data = "", mode = "rwx" } }, "bad argument 'entries[1].mode'" },
        { { { name = "a", data = "" }, { name = "./a", data = "" } }, "duplicate name 'a'" },
        { { { name = "a", data = "" }, { name = "a/b", data = "" } }, "'a' is a file and a directory" },
        { { { name = "a", data = "" }, { name = "a", type = "directory" } }, "'a' is a file and a directory" },
      }
      for _, c in ipairs(cases) do
        local ok, err = pcall(fs.tar, dir .. "/bad.tar", c[1])
        assert.is_false(ok)
        assert.is_truthy(err:find(c[2], 1, true), err)
        assert.are.equal("drover.fs.tar:", err:sub(1, 14))
      end
      local ok, err = pcall(fs.tar, dir .. "/bad.tar", {}, { mtime = -1 })
      assert.is_false(ok)
      assert.matches("bad option 'mtime'", err)
      assert.are.same({}, fs.list(dir))
    end)

    it("reports unreadable sources io-style and leaves nothing behind", function()
      local v, msg = fs.tar(dir .. "/x.tar", { { name = "a", path = dir .. "/missing" } })
      assert.is_nil(v)
      assert.are.equal("drover.fs.tar: " .. dir .. "/missing: No such file or directory", msg)
      v, msg = fs.tar(dir .. "/x.tar", { { name = "a", path = dir } })
      assert.is_nil(v)
      assert.matches("is a directory %(use type=\"directory\"%)", msg)
      assert.are.same({}, fs.list(dir))
    end)

    it("an empty archive is valid", function()
      assert.is_true(fs.tar(dir .. "/e.tar", {}))
      local out, ok = sh("tar -tf " .. q(dir .. "/e.tar"))
      assert(ok, out)
      assert.are.equal("", out)
      assert.are.same({}, fs.untar(dir .. "/e.tar", dir .. "/x"))
    end)

    it("tar_dir archives a tree that untar restores", function()
      tree(dir .. "/src")
      assert(fs.mkdir(dir .. "/src/empty-dir"))
      assert.is_true(fs.tar_dir(dir .. "/t.tar", dir .. "/src", { prefix = "pkg-1.0" }))
      local names = assert(fs.untar(dir .. "/t.tar", dir .. "/out"))
      assert.are.same({ "pkg-1.0/README", "pkg-1.0/bin", "pkg-1.0/bin/run", "pkg-1.0/block",
        "pkg-1.0/empty", "pkg-1.0/empty-dir" }, names)
      for _, f in ipairs(fs.walk(dir .. "/src")) do
        assert.are.equal(fs.sha256(dir .. "/src/" .. f), fs.sha256(dir .. "/out/pkg-1.0/" .. f))
      end
      assert.are.equal("directory", fs.stat(dir .. "/out/pkg-1.0/empty-dir").type)
      assert(sh("ln -s README " .. q(dir .. "/src/link")))
      local v, msg = fs.tar_dir(dir .. "/t2.tar", dir .. "/src")
      assert.is_nil(v)
      assert.matches("cannot archive a link", msg)
    end)
  end)

  -----------------------------------------------------------------------------
  describe("untar", function()
    local function assert_refused(archive, dest, pattern)
      local v, msg = fs.untar(archive, dest)
      assert.is_nil(v)
      assert.is_string(msg)
      assert.are.equal("drover.fs.untar: " .. archive .. ": ", msg:sub(1, #archive + 19))
      assert.matches(pattern, msg)
      -- validated before anything was written: not even the destination exists
      assert.is_false(fs.exists(dest))
      return msg
    end

    it("extracts what GNU tar made (GNU format, long names, links)", function()
      local src = dir .. "/src"
      local long = string.rep("n", 120) .. "/" .. string.rep("m", 120)
      assert(fs.mkdir(src .. "/" .. long))
      assert(fs.write(src .. "/" .. long .. "/f", "long"))
      assert(fs.mkdir(src .. "/lib"))
      assert(fs.write(src .. "/lib/libx.so.1", "ELF", { mode = "755" }))
      assert(sh(("cd %s && ln -s libx.so.1 lib/libx.so && mkdir bin && ln -s ../lib/libx.so.1 bin/x && ln lib/libx.so.1 hard")
        :format(q(src))))
      local out, ok = sh(("tar --format=gnu -cf %s -C %s ."):format(q(dir .. "/g.tar"), q(src)))
      assert(ok, out)
      local names = assert(fs.untar(dir .. "/g.tar", dir .. "/out"))
      assert.is_true(#names >= 8)
      assert.are.equal("long", fs.read(dir .. "/out/" .. long .. "/f"))
      assert.are.equal("ELF", fs.read(dir .. "/out/lib/libx.so"))
      assert.are.equal("ELF", fs.read(dir .. "/out/bin/x"))
      assert.are.equal("link", fs.stat(dir .. "/out/bin/x").type)
      assert.are.equal(octal("755"), fs.stat(dir .. "/out/lib/libx.so.1").mode)
      -- the hard link shares the inode
      assert.are.equal(sh("stat -c %i " .. q(dir .. "/out/lib/libx.so.1")), sh("stat -c %i " .. q(dir .. "/out/hard")))
    end)

    it("extracts pax archives (Python's default format) with long names", function()
      local long = string.rep("p", 200) .. "/" .. string.rep("q", 150)
      pytar(dir .. "/p.tar", ([[
tar.addfile(info("top", type=tarfile.DIRTYPE, mode=0o755))
add("top/%s", b"pax long name")
add("top/ünïcode.txt", "héllo".encode())
tar.addfile(info("top/l", type=tarfile.SYMTYPE, linkname="ünïcode.txt"))
]]):format(long))
      local names = assert(fs.untar(dir .. "/p.tar", dir .. "/out"))
      assert.are.same({ "top", "top/" .. long, "top/ünïcode.txt", "top/l" }, names)
      assert.are.equal("pax long name", fs.read(dir .. "/out/top/" .. long))
      assert.are.equal("héllo", fs.read(dir .. "/out/top/l"))
    end)

    it("restores file mtimes and strips setuid and group/other write", function()
      pytar(dir .. "/m.tar", [[
add("suid", b"x", mode=0o4777, mtime=1000000000)
add("ro", b"y", mode=0o444)
tar.addfile(info("d", type=tarfile.DIRTYPE, mode=0o777))
]])
      assert(fs.untar(dir .. "/m.tar", dir .. "/out"))
      assert.are.equal(octal("755"), fs.stat(dir .. "/out/suid").mode)
      assert.are.equal(octal("644"), fs.stat(dir .. "/out/ro").mode)
      assert.are.equal(octal("755"), fs.stat(dir .. "/out/d").mode)
      assert.are.equal(1000000000, math.floor(fs.stat(dir .. "/out/suid").mtime))
    end)

    it("refuses absolute names (tar -P), naming the entry", function()
      local victim = dir .. "/victim"
      assert(fs.write(dir .. "/payload", "pwned"))
      local out, ok = sh(("tar -P -cf %s --transform=%s %s"):format(q(dir .. "/abs.tar"),
        q("s|.*/payload$|" .. victim .. "|"), q(dir .. "/payload")))
      assert(ok, out)
      assert.are.equal(victim .. "\n", (sh("tar -P -tf " .. q(dir .. "/abs.tar"))))
      local msg = assert_refused(dir .. "/abs.tar", dir .. "/out", "entry '" .. victim:gsub("%p", "%%%0") .. "': absolute name")
      assert.is_false(fs.exists(victim), msg)
    end)

    it("refuses '..' components", function()
      pytar(dir .. "/dd.tar", [[
add("fine", b"ok")
add("a/../../escaped", b"pwned")
]])
      assert_refused(dir .. "/dd.tar", dir .. "/out/x", "entry 'a/%.%./%.%./escaped': name contains a '%.%.' component")
      assert.is_false(fs.exists(dir .. "/escaped"))
      assert.is_false(fs.exists(dir .. "/out/fine"))
      -- GNU tar's --transform can plant one too
      assert(fs.write(dir .. "/p", "pwned"))
      assert(sh(("tar -cf %s -C %s --transform=%s p"):format(q(dir .. "/t.tar"), q(dir), q("s|^p$|../../p2|"))))
      assert_refused(dir .. "/t.tar", dir .. "/out/x", "entry '%.%./%.%./p2'")
    end)

    it("checks names from pax and GNU long-name records, not the ustar field", function()
      -- the ustar name field says "benign"; the pax record says otherwise
      pytar(dir .. "/pax.tar", [[
ti = info("benign", size=5, pax_headers={"path": "/tmp/drover-fs-spec-pax-escape"})
tar.addfile(ti, io.BytesIO(b"pwned"))
]])
      assert.matches("\n/tmp/drover%-fs%-spec%-pax%-escape\n$", (sh("tar -tf " .. q(dir .. "/pax.tar"))))
      assert_refused(dir .. "/pax.tar", dir .. "/out", "entry '/tmp/drover%-fs%-spec%-pax%-escape': absolute name")
      pytar(dir .. "/gnu.tar", ('add("%s/../../x", b"pwned")'):format(string.rep("l", 120)), "GNU_FORMAT")
      assert.matches("././@LongLink", fs.read(dir .. "/gnu.tar"), 1, true)
      assert_refused(dir .. "/gnu.tar", dir .. "/out", "name contains a '%.%.' component")
      pytar(dir .. "/gnulink.tar", ('tar.addfile(info("l", type=tarfile.SYMTYPE, linkname="%s/../../../x"))')
        :format(string.rep("k", 120)), "GNU_FORMAT")
      assert_refused(dir .. "/gnulink.tar", dir .. "/out", "'%.%.' after a normal component")
    end)

    it("refuses symbolic links that lead outside the destination", function()
      local cases = {
        { "abs", 'tar.addfile(info("abs", type=tarfile.SYMTYPE, linkname="/etc/passwd"))', "symbolic link target is absolute" },
        { "up", 'tar.addfile(info("d/up", type=tarfile.SYMTYPE, linkname="../../x"))', "points outside the destination" },
        { "mid", 'tar.addfile(info("mid", type=tarfile.SYMTYPE, linkname="a/../../x"))', "'%.%.' after a normal component" },
        -- each link looks inside on its own; together they escape
        { "chain", 'tar.addfile(info("l1", type=tarfile.SYMTYPE, linkname="."))\n' ..
          'tar.addfile(info("l2", type=tarfile.SYMTYPE, linkname="l1/.."))', "'%.%.' after a normal component" },
        { "empty", 'tar.addfile(info("e", type=tarfile.SYMTYPE, linkname=""))', "empty symbolic link target" },
      }
      for _, c in ipairs(cases) do
        local a = dir .. "/" .. c[1] .. ".tar"
        pytar(a, c[2])
        assert_refused(a, dir .. "/out", c[3])
      end
    end)

    it("refuses writing through a link, even a link that stays inside", function()
      -- link to a directory outside, then a file beneath it
      pytar(dir .. "/via.tar", [[
tar.addfile(info("sub", type=tarfile.DIRTYPE))
tar.addfile(info("esc", type=tarfile.SYMTYPE, linkname="sub"))
add("esc/file", b"pwned")
]])
      assert_refused(dir .. "/via.tar", dir .. "/out", "entry 'esc/file': 'esc' is not a directory in this archive")
      pytar(dir .. "/twice.tar", [[
add("x", b"file")
tar.addfile(info("x", type=tarfile.DIRTYPE))
]])
      assert_refused(dir .. "/twice.tar", dir .. "/out", "appears twice")
    end)

    it("does not follow a link already present in the destination", function()
      local outside = dir .. "/outside"
      assert(fs.mkdir(outside))
      assert(fs.mkdir(dir .. "/out"))
      assert(sh(("ln -s %s %s"):format(q(outside), q(dir .. "/out/evil"))))
      pytar(dir .. "/e.tar", 'add("evil/file", b"pwned")')
      local v, msg = fs.untar(dir .. "/e.tar", dir .. "/out")
      assert.is_nil(v)
      assert.matches("entry 'evil/file': 'evil' in the destination is a symbolic link or not a directory", msg)
      assert.are.same({}, fs.list(outside))
      -- nor replace the file a link points at
      assert(fs.write(outside .. "/target", "precious"))
      assert(sh(("ln -s %s %s"):format(q(outside .. "/target"), q(dir .. "/out/f"))))
      pytar(dir .. "/f.tar", 'add("f", b"new")')
      assert(fs.untar(dir .. "/f.tar", dir .. "/out"))
      assert.are.equal("precious", fs.read(outside .. "/target"))
      assert.are.equal("new", fs.read(dir .. "/out/f"))
    end)

    it("refuses hard links to anything but an earlier file in the archive", function()
      local cases = {
        { "h1", 'tar.addfile(info("h", type=tarfile.LNKTYPE, linkname="/etc/passwd"))', "hard link target '/etc/passwd': absolute name" },
        { "h2", 'tar.addfile(info("h", type=tarfile.LNKTYPE, linkname="../x"))', "hard link target '%.%./x'" },
        { "h3", 'tar.addfile(info("h", type=tarfile.LNKTYPE, linkname="later"))\nadd("later", b"x")', "not a regular file earlier in the archive" },
        { "h4", 'tar.addfile(info("s", type=tarfile.SYMTYPE, linkname="x"))\n' ..
          'tar.addfile(info("h", type=tarfile.LNKTYPE, linkname="s"))', "not a regular file earlier in the archive" },
      }
      for _, c in ipairs(cases) do
        local a = dir .. "/" .. c[1] .. ".tar"
        pytar(a, c[2])
        assert_refused(a, dir .. "/out", c[3])
      end
    end)

    it("refuses devices and fifos", function()
      pytar(dir .. "/dev.tar", 'tar.addfile(info("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3))')
      assert_refused(dir .. "/dev.tar", dir .. "/out", "entry 'null': device files are not allowed")
      pytar(dir .. "/fifo.tar", 'tar.addfile(info("p", type=tarfile.FIFOTYPE))')
      assert_refused(dir .. "/fifo.tar", dir .. "/out", "entry 'p': fifos are not allowed")
    end)

    it("reports corrupt and truncated archives", function()
      assert(fs.write(dir .. "/junk.tar", string.rep("not a tar file ", 100)))
      assert_refused(dir .. "/junk.tar", dir .. "/out", "bad header checksum")
      pytar(dir .. "/ok.tar", 'add("f", b"x" * 5000)')
      local whole = fs.read(dir .. "/ok.tar")
      assert(fs.write(dir .. "/cut.tar", whole:sub(1, 512 * 5)))
      assert_refused(dir .. "/cut.tar", dir .. "/out", "truncated archive")
      assert(fs.write(dir .. "/short.tar", whole:sub(1, 100)))
      assert_refused(dir .. "/short.tar", dir .. "/out", "truncated archive")
      local v, msg = fs.untar(dir .. "/none.tar", dir .. "/out")
      assert.is_nil(v)
      assert.are.equal("drover.fs.untar: " .. dir .. "/none.tar: No such file or directory", msg)
    end)

    it("sanitises control characters in entry names it reports", function()
      pytar(dir .. "/ctl.tar", 'add("/\\x1b[31mred", b"x")')
      local msg = assert_refused(dir .. "/ctl.tar", dir .. "/out", "absolute name")
      assert.is_nil(msg:find("\27", 1, true))
      assert.matches("entry '/%?%[31mred'", msg)
    end)

    it("a failed extraction removes what it wrote, and keeps what was there", function()
      -- "b" exists in the destination as a directory: the entry "b" fails
      -- after "a/", "a/x" and "c" were written
      assert(fs.mkdir(dir .. "/out/b"))
      assert(fs.write(dir .. "/out/keep", "mine"))
      pytar(dir .. "/p.tar", [[
tar.addfile(info("a", type=tarfile.DIRTYPE, mode=0o755))
add("a/x", b"partial")
add("c/d/e", b"deep")
tar.addfile(info("l", type=tarfile.SYMTYPE, linkname="a/x"))
add("b", b"cannot")
]])
      local v, msg = fs.untar(dir .. "/p.tar", dir .. "/out")
      assert.is_nil(v)
      assert.matches("entry 'b': a directory of that name exists in the destination", msg)
      local left = fs.list(dir .. "/out")
      table.sort(left)
      assert.are.same({ "b", "keep" }, left)
      assert.are.equal("mine", fs.read(dir .. "/out/keep"))
    end)

    it("round-trips fs.tar output", function()
      local entries = {}
      for i = 1, 30 do
        entries[i] = { name = ("d%d/f%02d"):format(i % 3, i), data = string.rep(string.char(64 + i), i * 97) }
      end
      assert(fs.tar(dir .. "/r.tar", entries))
      local names = assert(fs.untar(dir .. "/r.tar", dir .. "/out"))
      assert.are.equal(30, #names) -- parent directories are implicit, not entries
      for _, e in ipairs(entries) do
        assert.are.equal(e.data, fs.read(dir .. "/out/" .. e.name))
      end
    end)
  end)
end)
