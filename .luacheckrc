-- luacheck's settings for the whole tree (`luacheck .`).
std = "lua54"
-- A method that ignores self is still a method: its callers use `:`.
self = false
max_line_length = 150
exclude_files = { "tests/dashboard/node_modules/**", "build/**", "build-*/**", "bench/out/**" }
files["tests/**"] = { std = "+busted", max_line_length = 160 }
-- handlers and hooks there take the arguments their callers pass
files["tests/server_spec.lua"] = { std = "+busted", unused_args = false }
