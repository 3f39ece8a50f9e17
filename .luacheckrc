-- luacheck's settings for the whole tree (`luacheck .`).
std = "lua54"
-- A method that ignores self is still a method: its callers use `:`.
self = false
max_line_length = 150
exclude_files = { "tests/dashboard/node_modules/**", "build/**", "build-asan/**" }
files["tests/**"] = { std = "+busted" }
