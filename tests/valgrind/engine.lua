-- Exercised under valgrind by tests/run.sh: every primitive once, plus work
-- left pending when the engine closes.  valgrind must report no definite
-- leak and no error.
local drover = require "drover"
local fs, json = drover.fs, drover.json

local dir = fs.tempdir("drover-vg")
assert(fs.write(dir .. "/a.txt", "hello"))
assert(fs.sha256(dir .. "/a.txt"))
assert(fs.tar(dir .. "/x.tar", { { name = "a.txt", path = dir .. "/a.txt" }, { name = "b", data = "b" } }))
fs.mkdir(dir .. "/out")
assert(fs.untar(dir .. "/x.tar", dir .. "/out"))
assert(json.decode(json.encode({ a = { 1, 2, json.null }, b = json.array({}) })))
-- the JSON error paths free what they built (a Lua error jumps out of C)
assert(not pcall(json.encode, { f = function() end, deep = { { { 1.5, "x" } } } }))
local loop = {}; loop.self = loop
assert(not pcall(json.encode, loop))
assert(not json.decode('{"a": [1, 2, {"b": tru}]}'))
assert(not json.decode(string.rep("[", 2000)))
assert(json.encode(json.decode([[{"n": 9007199254740993, "f": 0.1, "s": "\u00e9\ud83d\ude00"}]]), { indent = 2 }))

local db = assert(drover.db.open(dir .. "/t.db"))
db:exec("CREATE TABLE t(x)")
db:transaction(function() for i = 1, 50 do db:run("INSERT INTO t VALUES(?)", i) end end)
assert(db:value("SELECT count(*) FROM t") == 50)
db:close()

local r = assert(drover.proc.run({ "sh", "-c", "echo out; echo err >&2" }))
assert(r.stdout == "out\n")
local page = drover.server.body(("p"):rep(100000)) -- a body object: still alive at close
local srv = assert(drover.server.listen {
  handler = function(req) return 200, {}, "pong " .. req.path end,
  fast = function(req) if req.path == "/page" then return 200, {}, page end end,
})
local results = drover.all {
  function() return drover.http.get(srv.url .. "/a").body end,
  function() return #drover.http.get(srv.url .. "/page").body end,
  function() return drover.proc.run({ "true" }).code end,
  function() drover.sleep(0.01); return "slept" end,
}
assert(results[1] == "pong /a" and results[2] == 100000 and results[3] == 0 and results[4] == "slept")
drover.server.body("dropped") -- collected with nothing sent
local h = drover.spawn(function() drover.sleep(30) end)
drover.sleep(0.01)
h:cancel()
assert(not h:wait())
local ev = drover.event()
drover.spawn(function() ev:wait() end)                      -- left waiting at close
drover.spawn(function() drover.sleep(3600) end)             -- left sleeping at close
drover.proc.spawn({ "sleep", "3600" })                      -- left running: killed at close
drover.on_signal("USR1", function() end)
srv:close()
fs.remove(dir, { recursive = true })
os.exit(0, true) -- close the state (and the engine) with work pending
