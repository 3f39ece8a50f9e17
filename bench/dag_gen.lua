-- bench/dag_gen.lua -- the task graphs bench/dag.sh runs, for every runner.
--
--   lua5.4 bench/dag_gen.lua deps  random|chain N SEED  > deps.txt
--   lua5.4 bench/dag_gen.lua make  deps.txt             > Makefile
--   lua5.4 bench/dag_gen.lua snake deps.txt             > Snakefile
--   lua5.4 bench/dag_gen.lua drover deps.txt            > dag_flow.lua
--
-- `deps` draws the graph once: line i is "i: d1 d2 ..." (the nodes node i
-- depends on).  random: node i depends on up to 3 distinct earlier nodes,
-- chosen with a fixed linear congruential generator (the same graph for a
-- given SEED on any machine and Lua version); chain: node i depends on
-- node i-1.  `make`, `snake` and `drover` turn that file into each
-- runner's input: a Makefile, a Snakefile, a drover workflow (run with
-- `drover exec`).
local cmd = arg[1]

local function read_deps(path)
  local deps = {}
  for line in io.lines(path) do
    local i, rest = line:match("^(%d+):(.*)$")
    assert(i, "bad line in " .. path .. ": " .. line)
    local d = {}
    for j in rest:gmatch("%d+") do d[#d + 1] = tonumber(j) end
    deps[tonumber(i)] = d
  end
  return deps
end

if cmd == "deps" then
  local shape, n, seed = arg[2], math.tointeger(tonumber(arg[3])), math.tointeger(tonumber(arg[4] or "1"))
  assert(shape == "random" or shape == "chain", "shape must be random or chain")
  assert(n and n > 0 and seed, "usage: dag_gen.lua deps random|chain N SEED")
  -- Numerical Recipes' LCG, mod 2^32: portable and reproducible.
  local state = seed % 4294967296
  local function rand(k) -- 0 .. k-1
    state = (1664525 * state + 1013904223) % 4294967296
    return (state >> 8) % k
  end
  local out = {}
  for i = 1, n do
    local d = {}
    if shape == "chain" then
      if i > 1 then d[1] = i - 1 end
    elseif i > 1 then
      local want = math.min(rand(4), i - 1)
      local seen = {}
      while #d < want do
        local j = 1 + rand(i - 1)
        if not seen[j] then seen[j] = true; d[#d + 1] = j end
      end
      table.sort(d)
    end
    out[i] = i .. ":" .. (#d > 0 and (" " .. table.concat(d, " ")) or "")
  end
  io.write(table.concat(out, "\n"), "\n")

elseif cmd == "make" then
  -- Phony targets (nothing on disk): make runs each recipe once per
  -- invocation, after its prerequisites.
  local deps = read_deps(arg[2])
  local names = {}
  for i = 1, #deps do names[i] = "n" .. i end
  local out = { ".PHONY: all " .. table.concat(names, " "), "all: " .. table.concat(names, " ") }
  for i, d in ipairs(deps) do
    local pre = {}
    for k, j in ipairs(d) do pre[k] = "n" .. j end
    out[#out + 1] = "n" .. i .. ":" .. (#pre > 0 and (" " .. table.concat(pre, " ")) or "")
    out[#out + 1] = "\t@true"
  end
  io.write(table.concat(out, "\n"), "\n")

elseif cmd == "snake" then
  -- Snakemake tracks files, so each node is an empty marker file written
  -- by touch() once its `true` has run; one wildcard rule with an input
  -- function is how such a graph is written for Snakemake.
  local deps = read_deps(arg[2])
  local lines = {}
  for i, d in ipairs(deps) do lines[i] = "    " .. i .. ": [" .. table.concat(d, ", ") .. "]," end
  io.write("DEPS = {\n", table.concat(lines, "\n"), "\n}\n\n")
  io.write(([==[
rule all:
    input: expand("out/n{i}", i=range(1, %d))

rule node:
    input: lambda wc: ["out/n%%d" %% j for j in DEPS[int(wc.i)]]
    output: touch("out/n{i}")
    wildcard_constraints: i="[0-9]+"
    shell: "true"
]==]):format(#deps + 1))

elseif cmd == "drover" then
  -- One flow run: a drover.task per node (tag "cpu", at most 2 at a time),
  -- each started by a drover.spawn that first joins the handles of the
  -- nodes it depends on.
  local deps = read_deps(arg[2])
  local lines = {}
  for i, d in ipairs(deps) do lines[i] = "  {" .. table.concat(d, ",") .. "}," end
  io.write("local DEPS = {\n", table.concat(lines, "\n"), "\n}\n\n")
  io.write([[
local drover = require "drover"
local run = drover.proc.run
drover.limit("cpu", 2)
local handles = {}
for i, d in ipairs(DEPS) do
  local node = drover.task("n" .. i, function()
    local r = assert(run({ "true" }))
    if r.code ~= 0 then error("true exited with " .. tostring(r.code)) end
  end, { tags = { "cpu" } })
  handles[i] = drover.spawn(function()
    for _, j in ipairs(d) do handles[j]:join() end
    node()
  end)
end
for i = 1, #handles do handles[i]:join() end
]])

else
  io.stderr:write("usage: lua5.4 bench/dag_gen.lua deps random|chain N SEED | make|snake|drover DEPS\n")
  os.exit(2)
end
