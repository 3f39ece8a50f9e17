-- drover.json: the C encoder/decoder (engine/src/json.c) behind drover.json.
local json = require "drover.json"
local H = require "helper"

--- Strip the "file:line: " that error(msg, 2) adds.
local function raised(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return (tostring(err):gsub("^[^:]*:%d+: ", ""))
end

describe("drover.json", function()
  describe("encode", function()
    it("encodes scalars", function()
      assert.are.equal("null", json.encode(nil))
      assert.are.equal("null", json.encode(json.null))
      assert.are.equal("true", json.encode(true))
      assert.are.equal("false", json.encode(false))
      assert.are.equal("0", json.encode(0))
      assert.are.equal("-17", json.encode(-17))
      assert.are.equal("1.5", json.encode(1.5))
      assert.are.equal("0.1", json.encode(0.1))
      assert.are.equal("3", json.encode(3.0))
      assert.are.equal("1e+300", json.encode(1e300))
      assert.are.equal('""', json.encode(""))
      assert.are.equal('"plain"', json.encode("plain"))
    end)

    it("keeps integers exact, beyond 2^53 and at the int64 limits", function()
      assert.are.equal("9007199254740993", json.encode(9007199254740993))
      assert.are.equal("9223372036854775807", json.encode(math.maxinteger))
      assert.are.equal("-9223372036854775808", json.encode(math.mininteger))
      -- floats: the shortest text that reads back as the same double
      for _, x in ipairs { 1 / 3, 2 ^ 0.5, 123456.789, 5e-324, 1.7976931348623157e308, -0.1 } do
        assert.are.equal(x, tonumber(json.encode(x)))
      end
    end)

    it("escapes what JSON requires and leaves UTF-8 and '/' alone", function()
      assert.are.equal([["a\"b\\c\n\t\r\b\f\u0000\u001f\u007f"]], json.encode('a"b\\c\n\t\r\b\f\0\31\127'))
      assert.are.equal('"http://example.com/a"', json.encode("http://example.com/a"))
      assert.are.equal('"héllo wörld ✓ 😀"', json.encode("héllo wörld ✓ 😀"))
    end)

    it("refuses strings that are not UTF-8, naming where they are", function()
      assert.are.equal("drover.json.encode: value.blob: invalid UTF-8 in string",
        raised(json.encode, { blob = "\255\254" }))
      assert.are.equal("drover.json.encode: value: invalid UTF-8 in string", raised(json.encode, "\192\128"))
    end)

    it("encodes sequences as arrays and string-keyed tables as objects", function()
      assert.are.equal("[1,2,3]", json.encode { 1, 2, 3 })
      assert.are.equal('{"a":1,"b":[true,false]}', json.encode { b = { true, false }, a = 1 })
      assert.are.equal('[{"x":[[]]}]', json.encode { { x = { json.array() } } })
    end)

    it("encodes empty tables as {} unless marked with json.array", function()
      assert.are.equal("{}", json.encode {})
      assert.are.equal("[]", json.encode(json.array {}))
      assert.are.equal("[]", json.encode(json.array()))
      assert.are.equal("{}", json.encode(json.object {}))
      assert.are.equal('{"list":[],"map":{}}', json.encode { list = json.array(), map = {} })
      local t = json.array { "x" }
      assert.are.equal(t, json.array(t)) -- returns its argument
      assert.are.equal("array", json.kind(t))
    end)

    it("marking does not disturb a table's own metatable", function()
      local mt = { __index = function() return "dflt" end }
      local t = json.array(setmetatable({}, mt))
      assert.are.equal(mt, getmetatable(t))
      assert.are.equal("[]", json.encode(t))
    end)

    it("json.object writes integer keys as strings", function()
      assert.are.equal('{"1":"a","2":"b","x":true}', json.encode(json.object { "a", "b", x = true }))
      assert.are.equal('{"404":"missing"}', json.encode(json.object { [404] = "missing" }))
      assert.are.equal('drover.json.encode: value: duplicate object key "1"',
        raised(json.encode, json.object { [1] = "a", ["1"] = "b" }))
    end)

    it("sorts object keys by default, so output is deterministic", function()
      local t = {}
      for i = 1, 50 do t["k" .. (i * 7919 % 101)] = i end
      local s = json.encode(t)
      local last = ""
      for k in s:gmatch('"(k%d+)":') do
        assert.is_true(k > last)
        last = k
      end
      local unsorted = json.encode(t, { sort_keys = false })
      assert.are.same(json.decode(s), json.decode(unsorted))
    end)

    it("holes in arrays become null; excessively sparse arrays are an error", function()
      assert.are.equal("[1,null,3]", json.encode { 1, nil, 3 })
      assert.are.equal("[null,null,3]", json.encode { [3] = 3 })
      assert.are.equal("drover.json.encode: value.ids: excessively sparse array (2 elements, largest index 1000); use json.object",
        raised(json.encode, { ids = { [1] = 1, [1000] = 2 } }))
      assert.are.equal('{"1":1,"1000":2}', json.encode(json.object { [1] = 1, [1000] = 2 }))
    end)

    it("refuses mixed and non-string keys with a hint", function()
      assert.are.equal("drover.json.encode: value.t: table with both string and integer keys; use json.object (integer keys become strings) or json.array",
        raised(json.encode, { t = { 1, 2, x = 3 } }))
      assert.matches("table key 0 is neither a string nor a positive integer",
        raised(json.encode, { [0] = "zero" }))
      assert.matches("table key true is neither", raised(json.encode, { [true] = 1 }))
      assert.matches("value: array with a non%-index key \"x\"", raised(json.encode, json.array { 1, x = 2 }))
    end)

    it("names the key path of a value it cannot encode", function()
      assert.are.equal("drover.json.encode: value.steps[2].run: cannot encode function",
        raised(json.encode, { steps = { { run = "make" }, { run = print } } }))
      assert.are.equal('drover.json.encode: value["odd key"][1]: cannot encode thread',
        raised(json.encode, { ["odd key"] = { coroutine.create(print) } }))
      assert.are.equal("drover.json.encode: value: cannot encode userdata", raised(json.encode, io.stdout))
      assert.are.equal("drover.json.encode: value.x: cannot encode NaN or infinity",
        raised(json.encode, { x = 0 / 0 }))
      assert.are.equal("drover.json.encode: value[1]: cannot encode NaN or infinity",
        raised(json.encode, { math.huge }))
    end)

    it("the error points at the caller's line", function()
      local ok, err = pcall(function()
        local s = json.encode { f = print } -- not a tail call: keep this frame
        return s
      end)
      assert.is_false(ok)
      assert.matches("^tests/json_spec%.lua:%d+: drover%.json%.encode: value%.f: cannot encode function$", err)
    end)

    it("detects cycles and absurd nesting", function()
      local t = { a = {} }
      t.a.back = t
      assert.are.equal("drover.json.encode: value.a.back: cycle (a table that contains itself)",
        raised(json.encode, t))
      local deep = {}
      local cur = deep
      for _ = 1, 1500 do
        cur[1] = {}
        cur = cur[1]
      end
      assert.matches("nesting deeper than 1000 levels", raised(json.encode, deep))
      -- the same table twice (not a cycle) is fine
      local shared = { 1 }
      assert.are.equal('{"a":[1],"b":[1]}', json.encode { a = shared, b = shared })
    end)

    it("pretty-prints with indent", function()
      local v = { name = "x", list = { 1, { deep = true } }, empty = json.array(), obj = {} }
      local s = json.encode(v, { indent = 2 })
      assert.are.equal([[
{
  "empty": [],
  "list": [
    1,
    {
      "deep": true
    }
  ],
  "name": "x",
  "obj": {}
}]], s)
      assert.are.equal(json.encode(v), json.encode(json.decode(s)))
      assert.are.equal('[\n\t1\n]', json.encode({ 1 }, { indent = "\t" }))
    end)

    it("writes number keys of json.object by their text and sorts names bytewise", function()
      assert.are.equal('{"1.5":"f","10":"b","9":"a"}', json.encode(json.object { [9] = "a", [10] = "b", [1.5] = "f" }))
      assert.are.equal('{"B":1,"_":2,"a":3,"a\\u0000":4,"ab":5}',
        json.encode { a = 3, B = 1, _ = 2, ab = 5, ["a\0"] = 4 })
      assert.are.equal("drover.json.encode: value: duplicate object key \"2\"",
        raised(json.encode, json.object { [2] = 1, ["2"] = 2, x = 3 }))
      assert.are.equal("drover.json.encode: value: object key of type boolean",
        raised(json.encode, json.object { [true] = 1 }))
      assert.are.equal("drover.json.encode: value: cannot use NaN or infinity as an object key",
        raised(json.encode, json.object { [math.huge] = 1 }))
    end)

    it("quotes odd keys in error paths as %q does, and names bad keys", function()
      assert.are.equal('drover.json.encode: value["a\\"b\\\n"][3]["1x"]: cannot encode function',
        raised(json.encode, { ['a"b\n'] = { 1, 2, { ["1x"] = print } } }))
      assert.are.equal('drover.json.encode: value[""]._ok9: cannot encode userdata',
        raised(json.encode, { [""] = { _ok9 = io.stdout } }))
      assert.are.equal("drover.json.encode: value[1.5]: cannot encode function",
        raised(json.encode, json.object { [1.5] = print }))
      assert.are.equal("drover.json.encode: value: table key -1 is neither a string nor a positive integer; "
        .. "use json.object to write number keys as strings", raised(json.encode, { [-1] = 1 }))
      assert.are.equal("drover.json.encode: value: table key 2.5 is neither a string nor a positive integer; "
        .. "use json.object to write number keys as strings", raised(json.encode, { [2.5] = 1 }))
    end)

    it("checks UTF-8 as utf8.len does: overlongs, surrogates, beyond U+10FFFF, truncation", function()
      for _, bad in ipairs { "\192\128", "\224\128\128", "\237\160\128", "\244\144\128\128",
        "\226\130", "x\128", "\248\136\128\128\128" } do
        assert.is_nil(utf8.len(bad))
        assert.are.equal("drover.json.encode: value[2]: invalid UTF-8 in string", raised(json.encode, { "ok", bad }))
        -- the key is part of the path, quoted as %q does (bytes >= 128 as they are)
        assert.are.equal('drover.json.encode: value["' .. bad .. '"]: invalid UTF-8 in string',
          raised(json.encode, { [bad] = 1 }))
      end
      assert.are.equal('"\u{10FFFF}\u{D7FF}\u{E000}"', json.encode("\u{10FFFF}\u{D7FF}\u{E000}"))
    end)

    it("encodes long strings with escapes and multi-byte characters anywhere", function()
      local parts = {}
      for i = 1, 5000 do parts[i] = (i % 3 == 0) and "é\n" or ((i % 7 == 0) and "😀\1" or "ab") end
      local s = table.concat(parts)
      local out = json.encode(s)
      assert.are.equal(s, json.decode(out))
      assert.is_nil(out:find("\n", 1, true))
      assert.are.equal(#s + 2 + select(2, s:gsub("\n", "")) + 5 * select(2, s:gsub("\1", "")), #out)
    end)

    it("accepts indent 0 or \"\" as compact, and nests exactly 1000 levels", function()
      assert.are.equal('{"a":[1]}', json.encode({ a = { 1 } }, { indent = 0 }))
      assert.are.equal('{"a":[1]}', json.encode({ a = { 1 } }, { indent = "" }))
      local deep = {}
      local cur = deep
      for _ = 1, 999 do
        cur[1] = {}
        cur = cur[1]
      end
      local s = json.encode(deep) -- 1000 tables: the limit, not beyond
      assert.are.equal(("["):rep(999) .. "{}" .. ("]"):rep(999), s)
      cur[1] = {}
      assert.matches("nesting deeper than 1000 levels", raised(json.encode, deep))
    end)

    it("writes floats as the shortest text that reads back, at their extremes too", function()
      assert.are.equal("-0", json.encode(-0.0))
      assert.are.equal("4.9406564584125e-324", json.encode(5e-324)) -- 14 digits already read back
      assert.are.equal("1.7976931348623157e+308", json.encode(1.7976931348623157e308))
      assert.are.equal("9.223372036854776e+18", json.encode(2.0 ^ 63)) -- 16 digits suffice
      assert.are.equal("0.30000000000000004", json.encode(0.1 + 0.2))
    end)

    it("checks its options", function()
      assert.matches("bad argument 'opts' %(table or nil expected, got string%)", raised(json.encode, 1, "x"))
      assert.matches("bad option 'indent'", raised(json.encode, 1, { indent = true }))
      assert.matches("drover.json.array: bad argument 't' %(table expected, got string%)", raised(json.array, "x"))
      assert.matches("drover.json.object: bad argument 't' %(table expected, got number%)", raised(json.object, 1))
    end)
  end)

  describe("decode", function()
    it("decodes documents, with integers as Lua integers", function()
      local v = assert(json.decode('{"a":1,"b":[1.5,-2,3e2,2.0],"c":"s","d":true,"e":false}'))
      assert.are.same({ a = 1, b = { 1.5, -2, 300, 2 }, c = "s", d = true, e = false }, v)
      assert.are.equal("integer", math.type(v.a))
      assert.are.equal("integer", math.type(v.b[2]))
      assert.are.equal("integer", math.type(v.b[3]))
      assert.are.equal("float", math.type(v.b[1]))
      assert.are.equal("1", tostring(v.a)) -- not "1.0"
      assert.are.equal(42, json.decode("42"))
      assert.are.equal("top", json.decode('"top"'))
      assert.are.equal(false, json.decode("false"))
    end)

    it("keeps large integers exact", function()
      local v = assert(json.decode('{"id":1234567890123456789,"neg":-9223372036854775808,"max":9223372036854775807,"n":9007199254740993}'))
      assert.are.equal(1234567890123456789, v.id)
      assert.are.equal(math.mininteger, v.neg)
      assert.are.equal(math.maxinteger, v.max)
      assert.are.equal(9007199254740993, v.n)
      assert.are.equal("integer", math.type(v.id))
      -- beyond int64 a float is the best there is
      local big = json.decode("[123456789012345678901234]")[1]
      assert.are.equal("float", math.type(big))
      assert.are.equal(1.2345678901234568e23, big)
      -- digits inside strings are not touched
      assert.are.equal("id 12345678901234567890", json.decode('"id 12345678901234567890"'))
    end)

    it("gives json.null for null, which encode writes back", function()
      local v = assert(json.decode('{"a":null,"b":[1,null,3]}'))
      assert.are.equal(json.null, v.a)
      assert.are.equal(json.null, v.b[2])
      assert.are.equal(3, #v.b)
      assert.are.equal('{"a":null,"b":[1,null,3]}', json.encode(v))
      assert.are.equal(json.null, json.decode("null"))
      assert.are.equal(require("cjson").null, json.null)
    end)

    it("keeps [] and {} apart, so they round-trip", function()
      assert.are.equal("[]", json.encode(json.decode("[]")))
      assert.are.equal("{}", json.encode(json.decode("{}")))
      local s = '{"a":[],"b":{},"c":[[],[{}],{"d":[ ]}],"e":"[]"}'
      local v = assert(json.decode(s))
      assert.are.equal("array", json.kind(v.a))
      assert.are.equal("[]", v.e) -- a string that looks like an empty array is a string
      assert.are.equal('{"a":[],"b":{},"c":[[],[{}],{"d":[]}],"e":"[]"}', json.encode(v))
    end)

    it("is not confused by strings that look like its internal markers", function()
      local s = '{"a":[],"b":"\\u0000dj00000000:","c":["\\u0000dj12345678:1"],"n":12345678901234567}'
      for _ = 1, 20 do
        local v = assert(json.decode(s))
        assert.are.equal("\0dj00000000:", v.b)
        assert.are.equal("\0dj12345678:1", v.c[1])
        assert.are.equal(12345678901234567, v.n)
        assert.are.equal("[]", json.encode(v.a))
      end
    end)

    it("decodes unicode escapes, surrogate pairs included", function()
      assert.are.equal("é✓😀", json.decode('"\\u00e9\\u2713\\ud83d\\ude00"'))
      assert.are.equal("é✓😀", json.decode('"é✓😀"'))
      assert.are.equal("a\0b", json.decode('"a\\u0000b"'))
      assert.are.equal('"/\\', json.decode('"\\"\\/\\\\"'))
    end)

    it("returns nil and a clear message for malformed text", function()
      local cases = {
        { "", "Expected value but found the end of the text at character 1" },
        { "[1,]", "Expected value but found ']' at character 4" },
        { '{"a":1,}', "Expected object key string but found '}' at character 8" },
        { "{1:2}", "Expected object key string but found a number at character 2" },
        { "[1] x", "Expected the end but found invalid token at character 5" },
        { "NaN", "Expected value but found invalid token at character 1" },
        { "Infinity", "invalid token" },
        { "0x10", "invalid number" },
        { "[01]", "invalid number" },
        { '"\\ud800"', "invalid unicode escape" },
        { '"\\x41"', "invalid escape code" },
        { "nul", "invalid token" },
        { "[", "found the end of the text" },
        { '{"a"', "found the end of the text" },
        { '"unterminated', "unexpected end of string" },
        { ("["):rep(1001) .. ("]"):rep(1001), "too many nested" },
      }
      for _, c in ipairs(cases) do
        local ok, v, msg = pcall(json.decode, c[1])
        assert.is_true(ok, "decode raised on " .. c[1])
        assert.is_nil(v)
        assert.are.equal("drover.json.decode: ", msg:sub(1, 20))
        assert.is_truthy(msg:find(c[2], 1, true), msg)
      end
    end)

    it("reports line and column in multi-line text", function()
      local v, msg = json.decode('{\n  "a": 1,\n  "b": oops\n}')
      assert.is_nil(v)
      assert.are.equal("drover.json.decode: Expected value but found invalid token at character 20 (line 3, column 8)", msg)
    end)

    it("turns integral numbers into integers and the rest into floats", function()
      local v = assert(json.decode("[1e2,-0,1.0e1,9223372036854775808,-9223372036854775809,1e300,-1.5e-3,0.5]"))
      assert.are.equal("integer", math.type(v[1]))
      assert.are.equal(100, v[1])
      assert.are.equal("integer", math.type(v[2]))
      assert.are.equal(10, v[3])
      assert.are.equal("float", math.type(v[4])) -- beyond int64
      assert.are.equal(2.0 ^ 63, v[4])
      assert.are.equal("float", math.type(v[5]))
      assert.are.equal(1e300, v[6])
      assert.are.equal(-1.5e-3, v[7])
      assert.are.equal(0.5, v[8])
    end)

    -- issue 12, item 8: -9223372036854775809 became a float that encoded
    -- as "-9.223372036854776e+18", which decoded as the integer -2^63.
    it("keeps a float just below int64 a float through decode, encode, decode", function()
      for _, text in ipairs { "-9223372036854775809", "-9.223372036854776e+18", "-9223372036854775808.0",
        "9223372036854775808", "9.223372036854776e+18" } do
        local v = assert(json.decode(text))
        assert.are.equal("float", math.type(v), text)
        local again = json.encode(v)
        local back = assert(json.decode(again))
        assert.are.equal("float", math.type(back), text .. " -> " .. again)
        assert.are.equal(v, back)
        assert.are.equal(again, json.encode(back))
      end
      -- the integer token stays exact
      assert.are.equal(math.mininteger, json.decode("-9223372036854775808"))
      assert.are.equal("integer", math.type(json.decode("-9223372036854775808")))
    end)

    -- issue 12, item 8: 1e400 decoded to inf, which encode then refused.
    it("refuses numbers beyond a double's range, naming where", function()
      assert.are.same({ nil, "drover.json.decode: number out of range at byte 1 (line 1, column 1)" },
        { json.decode("1e400") })
      assert.are.same({ nil, "drover.json.decode: number out of range at byte 6 (line 2, column 2)" },
        { json.decode("[1,\n -1e400]") })
      assert.are.same({ nil, "drover.json.decode: number out of range at byte 6 (line 1, column 6)" },
        { json.decode('{"a":' .. ("9"):rep(400) .. "}") })
      -- underflow is not out of range: it reads as zero, as strtod rounds it
      assert.are.equal(0, json.decode("1e-400"))
    end)

    it("refuses every malformed number", function()
      for _, text in ipairs { "-", "1.", ".5", "1e", "1e+", "+1", "-01", "1.5.2", "0x1F", "1ee2", "--1", "Infinity", "-Infinity" } do
        local v, msg = json.decode("[" .. text .. "]")
        assert.is_nil(v, text)
        assert.is_truthy(msg:find("invalid", 1, true), msg)
      end
    end)

    it("checks unicode escapes and their surrogate pairs", function()
      for _, text in ipairs { '"\\udc00"', '"\\ud800x"', '"\\ud800\\u0041"', '"\\u12"', '"\\u12g4"' } do
        local v, msg = json.decode(text)
        assert.is_nil(v, text)
        assert.is_truthy(msg:find("invalid unicode escape", 1, true), msg)
      end
      assert.are.equal("\u{10FFFF}", json.decode('"\\udbff\\udfff"'))
      assert.are.equal("\u{7FF}\u{800}\u{FFFF}", json.decode('"\\u07FF\\u0800\\uffff"'))
    end)

    it("names what it expected in objects and arrays", function()
      local cases = {
        { '{"a" 1}', "Expected colon but found a number at character 6" },
        { '{"a":1 "b":2}', "Expected comma or object end but found a string at character 8" },
        { "[1 2]", "Expected comma or array end but found a number at character 4" },
        { '{"a\\q":1}', "Expected object key string but found invalid escape code at character 4" },
        { "[tru]", "Expected value but found invalid token at character 2" },
      }
      for _, c in ipairs(cases) do
        local v, msg = json.decode(c[1])
        assert.is_nil(v)
        assert.are.equal("drover.json.decode: " .. c[2] .. " (line 1, column " .. c[2]:match("%d+$") .. ")", msg)
      end
    end)

    it("nests up to 1000 levels, and only empty arrays are marked", function()
      local v = assert(json.decode(("["):rep(1000) .. ("]"):rep(1000)))
      local depth = 1
      while v[1] do
        v = v[1]
        depth = depth + 1
      end
      assert.are.equal(1000, depth)
      assert.are.equal("array", json.kind(v))
      assert.is_nil(json.kind(json.decode("[1]")))
      assert.is_nil(json.kind(json.decode("{}")))
    end)

    it("reads NUL bytes as text, and accepts raw control characters in strings as cjson did", function()
      assert.are.equal("a\tb\0c\n", json.decode('"a\tb\0c\n"'))
      local v, msg = json.decode("[1]\0[2]") -- cjson stopped at the NUL and returned [1]
      assert.is_nil(v)
      assert.are.equal("drover.json.decode: Expected the end but found invalid token at character 4 (line 1, column 4)", msg)
    end)

    it("keeps the last of duplicate keys and accepts all four whitespace bytes", function()
      assert.are.same({ a = 2 }, json.decode(' \t\r\n{ "a" : 1 , "a" : 2 } \n'))
    end)

    it("refuses text that is not UTF-8", function()
      local v, msg = json.decode('["ok", "\255"]')
      assert.is_nil(v)
      assert.are.equal("drover.json.decode: invalid UTF-8 at byte 9", msg)
    end)

    it("never raises on garbage", function()
      local alphabet = '[]{}",:0123456789.eE+-tfnrulsa \\u\n\0\255'
      local seed = 12345
      local function rnd(n) seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n + 1 end
      for _ = 1, 2000 do
        local t = {}
        for i = 1, rnd(24) do
          local k = rnd(#alphabet)
          t[i] = alphabet:sub(k, k)
        end
        local text = table.concat(t)
        local ok, v, msg = pcall(json.decode, text)
        assert.is_true(ok, "decode raised on " .. ("%q"):format(text))
        if v == nil then assert.is_string(msg) end
      end
    end)

    it("raises on a non-string argument", function()
      assert.are.equal("drover.json.decode: bad argument 'text' (string expected, got nil)", raised(json.decode, nil))
      assert.are.equal("drover.json.decode: bad argument 'text' (string expected, got table)", raised(json.decode, {}))
    end)
  end)

  describe("round trips", function()
    it("decode(encode(v)) gives v back", function()
      local values = {
        { 1, 2, 3 },
        { a = { b = { c = { 1, "two", false, json.null } } } },
        { name = "drover", version = "0.1.0", deps = json.array(), env = {}, n = 9007199254740993 },
        { "héllo", "😀", "tab\there", "nul\0byte", "quote\"", "back\\slash" },
        { 0.1, -0.5, 1e-7, 6.02214076e23 },
        "just a string", 17, true,
      }
      for _, v in ipairs(values) do
        local s = json.encode(v)
        local back = assert(json.decode(s))
        assert.are.same(v, back)
        assert.are.equal(s, json.encode(back))
      end
    end)

    it("leaves math.random's sequence alone", function()
      math.randomseed(42)
      local want = { math.random(1e9), math.random(1e9) }
      math.randomseed(42)
      assert(json.decode('[[], 12345678901234567]')) -- the path that draws marker names
      assert.are.same(want, { math.random(1e9), math.random(1e9) })
    end)

    it("leaves the shared cjson module's settings alone", function()
      local cjson = require "cjson"
      assert.is_true(cjson.decode_invalid_numbers())
      json.decode("[1]")
      assert.is_true(cjson.decode_invalid_numbers())
    end)

    it("does not need cjson", function()
      local p = io.popen(("%q -e %q 2>&1"):format(H.lua,
        'local j = require "drover.json"; io.write(j.encode(j.decode("[[],1]")), " ", tostring(package.loaded.cjson))'))
      local out = p:read("a")
      p:close()
      assert.are.equal("[[],1] nil", out)
    end)

    it("works the same inside the drover binary", function()
      local script = os.tmpname()
      local f = assert(io.open(script, "w"))
      f:write([[
local json = require "drover.json"
local v = assert(json.decode('{"a":[],"n":12345678901234567,"u":"\\u00e9"}'))
io.write(json.encode(v), "\n")
drover = require "drover"
io.write(drover.json.encode(drover.json.array()), "\n")
]])
      f:close()
      local p = io.popen(("%q %q 2>&1"):format(H.drover_bin, script))
      local out = p:read("a")
      local ok = p:close()
      os.remove(script)
      assert.is_true(ok, out)
      assert.are.equal('{"a":[],"n":12345678901234567,"u":"é"}\n[]\n', out)
    end)
  end)
end)
