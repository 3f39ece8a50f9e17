# drover -- build, test, install.  Everything comes from Debian packages;
# `make deps` installs what is missing.
PREFIX   ?= /usr/local
DESTDIR  ?=
CC       ?= cc
PKGS      = lua5.4 libuv libcurl libcrypto sqlite3 libh2o
OPT      ?= -O2
CFLAGS   ?= $(OPT) -g
# -fvisibility=hidden: the libraries export the drover_* API (DROVER_API in
# drover.h) and what DRV_EXPORT marks in drover_int.h, nothing else.
DRV_CFLAGS = -std=c99 -D_GNU_SOURCE -fPIC -fvisibility=hidden -Wall -Wextra -Wno-unused-parameter \
             -Iengine/include -Iengine/src $(shell pkg-config --cflags $(PKGS) libpq) \
             -DDRV_PREFIX='"$(PREFIX)"'
# libcurl, libcrypto and libpq are dlopen()ed on first use (engine/src/lazylib.h,
# engine/src/pg.c): only their headers are needed at build time.  The HTTP server is the
# exception: its TLS (server.c) calls OpenSSL, which H2O loads anyway.
H2O_LIBS  = $(shell pkg-config --libs libh2o libssl libcrypto)
LIBS      = -Wl,--as-needed $(shell pkg-config --libs lua5.4 libuv sqlite3) $(H2O_LIBS) -lm -ldl -lpthread
BUILD    ?= build

# The sanitizer build lives in its own directory; everything built there
# (engine, binary, C tests) gets ASan + UBSan.
ifeq ($(BUILD),build-asan)
OPT      = -O1 -fsanitize=address,undefined -fno-omit-frame-pointer
LDFLAGS += -fsanitize=address,undefined
endif
# The fuzzing build (`make fuzz`): clang, the engine instrumented for
# libFuzzer's coverage, ASan and UBSan (any undefined behaviour aborts).
ifeq ($(BUILD),build-fuzz)
CC       = clang
OPT      = -O1 -g -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined \
           -fno-omit-frame-pointer
LDFLAGS += -fsanitize=address,undefined
endif

ENGINE_SRC = $(sort $(wildcard engine/src/*.c))
ENGINE_OBJ = $(ENGINE_SRC:engine/src/%.c=$(BUILD)/obj/%.o)
LUA_SRC    = $(sort $(wildcard lua/drover/*.lua lua/drover/*/*.lua))
LUA_CHUNKS = $(LUA_SRC:.lua=.luac)
HEADERS    = $(wildcard engine/src/*.h) engine/include/drover.h

SOVERSION = 0

.PHONY: all deps test test-c test-lua test-asan bench clean install uninstall fuzz FORCE
all: $(BUILD)/drover $(BUILD)/plugins/server.so $(BUILD)/libdrover.a $(BUILD)/libdrover.so $(BUILD)/lua/drover/core.so \
  $(LUA_CHUNKS)

deps:
	@bash tests/support/deps.sh

$(BUILD)/obj/%.o: engine/src/%.c $(HEADERS) | $(BUILD)/obj
	$(CC) $(CFLAGS) $(DRV_CFLAGS) -c $< -o $@

# api.c compiles PREFIX in: where a program linked with libdrover.a finds
# the Lua library (libdrover.so and the binary look next to themselves
# first).  A stamp that changes with PREFIX rebuilds it, so that
# `make install PREFIX=X` after a plain `make` installs files that look in X.
$(BUILD)/prefix.stamp: FORCE | $(BUILD)/obj
	@echo '$(PREFIX)' | cmp -s - $@ || echo '$(PREFIX)' > $@
$(BUILD)/obj/api.o: $(BUILD)/prefix.stamp
FORCE:

$(BUILD)/obj $(BUILD)/lua/drover:
	mkdir -p $@

$(BUILD)/libdrover.a: $(ENGINE_OBJ)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/libdrover.so: $(ENGINE_OBJ) engine/libdrover.map
	$(CC) $(CFLAGS) -shared -Wl,-soname,libdrover.so.$(SOVERSION) -Wl,--version-script=engine/libdrover.map \
	  -o $@ $(ENGINE_OBJ) $(LIBS) $(LDFLAGS)

# The binary: the engine linked in statically; Lua and engine symbols
# exported so that C modules loaded with require(), and the server plugin,
# find them.  The HTTP server is a plugin loaded on first use
# (engine/cli/server_loader.c says why), so the binary does not link H2O.
BIN_OBJ = $(filter-out $(BUILD)/obj/server.o,$(ENGINE_OBJ))
BIN_LIBS = -Wl,--as-needed $(shell pkg-config --libs lua5.4 libuv sqlite3) -lm -ldl -lpthread
$(BUILD)/drover: engine/cli/main.c engine/cli/server_loader.c $(BIN_OBJ) $(HEADERS) $(BUILD)/plugins/server.so
	$(CC) $(CFLAGS) $(DRV_CFLAGS) -Wl,-E -o $@ engine/cli/main.c engine/cli/server_loader.c \
	  $(BIN_OBJ) $(BIN_LIBS) $(LDFLAGS)

# Each module's compiled chunk beside its source, which require() loads
# instead of parsing the source while the source is not newer (see
# engine/src/searcher.c and tools/compile_lua.lua).
lua/drover/%.luac: lua/drover/%.lua tools/compile_lua.lua $(BUILD)/drover
	@$(BUILD)/drover tools/compile_lua.lua $(realpath $<)

$(BUILD)/plugins/server.so: $(BUILD)/obj/server.o
	@mkdir -p $(BUILD)/plugins
	$(CC) $(CFLAGS) -shared -Wl,-Bsymbolic -o $@ $< $(H2O_LIBS) $(LDFLAGS)

# drover.core for stock lua5.4: the interpreter provides the Lua symbols
# and its own require (api.c, the embedding API, and the searcher it
# installs, searcher.c, are left out).
$(BUILD)/lua/drover/core.so: $(ENGINE_OBJ) engine/libdrover.map | $(BUILD)/lua/drover
	$(CC) $(CFLAGS) -shared -Wl,--version-script=engine/libdrover.map -o $@ \
	  $(filter-out $(BUILD)/obj/api.o $(BUILD)/obj/searcher.o,$(ENGINE_OBJ)) \
	  $(shell pkg-config --libs libuv sqlite3) $(H2O_LIBS) -lm -ldl -lpthread $(LDFLAGS)

test: all
	@bash tests/run.sh

test-asan:
	$(MAKE) BUILD=build-asan all build-asan/lua5.4
	@DROVER_BUILD=build-asan bash tests/run.sh

bench: all
	@bash bench/run.sh

clean:
	rm -rf build build-asan build-fuzz
	rm -f $(LUA_CHUNKS)

# ---- fuzzing (tests/fuzz) ----------------------------------------------------------
# One libFuzzer binary per harness tests/fuzz/NAME.lua: tests/fuzz/driver.c
# with the harness's name compiled in, linked against the instrumented
# engine.  The engine's *at() calls go through the driver's wrappers
# (confinement checks for fs.untar).  Run them with tests/fuzz/run.sh.
FUZZ_TARGETS = $(patsubst tests/fuzz/%.lua,%,$(wildcard tests/fuzz/*.lua))
FUZZ_WRAP    = -Wl,--wrap=openat,--wrap=mkdirat,--wrap=symlinkat,--wrap=linkat,--wrap=unlinkat
fuzz:
	$(MAKE) BUILD=build-fuzz $(FUZZ_TARGETS:%=build-fuzz/fuzz/%)

build-fuzz/fuzz/%: tests/fuzz/driver.c tests/fuzz/%.lua build-fuzz/libdrover.a $(HEADERS)
	@mkdir -p build-fuzz/fuzz
	clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	  $(DRV_CFLAGS) -DDRV_FUZZ_TARGET='"$*"' -DDRV_FUZZ_ROOT='"$(CURDIR)"' -o $@ $< \
	  build-fuzz/libdrover.a $(LIBS) $(FUZZ_WRAP)

# ---- install -----------------------------------------------------------------
LIBDIR     = $(PREFIX)/lib
INCLUDEDIR = $(PREFIX)/include
SHAREDIR   = $(PREFIX)/share/drover
VERSION    = 0.1.0
INST       = $(DESTDIR)
STAGE      = $(if $(INST),$(abspath $(INST)))

# The installed binary finds its Lua library in PREFIX/share/drover/lua and
# the server plugin in PREFIX/lib/drover (see api.c and server_loader.c).
install: all
	install -d $(INST)$(PREFIX)/bin $(INST)$(LIBDIR)/pkgconfig $(INST)$(LIBDIR)/drover \
	  $(INST)$(INCLUDEDIR) $(INST)$(SHAREDIR)/lua/drover/dashboard $(INST)$(SHAREDIR)/lua/drover/orchestrator \
	  $(INST)$(SHAREDIR)/lua/drover/store \
	  $(INST)$(SHAREDIR)/backends/slurm \
	  $(INST)$(PREFIX)/share/man/man1
	install -m 755 $(BUILD)/drover $(INST)$(PREFIX)/bin/drover
	install -m 644 $(BUILD)/libdrover.a $(INST)$(LIBDIR)/libdrover.a
	install -m 755 $(BUILD)/libdrover.so $(INST)$(LIBDIR)/libdrover.so.$(VERSION)
	ln -sf libdrover.so.$(VERSION) $(INST)$(LIBDIR)/libdrover.so.$(SOVERSION)
	ln -sf libdrover.so.$(SOVERSION) $(INST)$(LIBDIR)/libdrover.so
	install -m 755 $(BUILD)/plugins/server.so $(INST)$(LIBDIR)/drover/server.so
	install -m 644 engine/include/drover.h $(INST)$(INCLUDEDIR)/drover.h
	install -m 644 lua/drover/*.lua $(INST)$(SHAREDIR)/lua/drover/
	install -m 644 lua/drover/orchestrator/*.lua $(INST)$(SHAREDIR)/lua/drover/orchestrator/
	install -m 644 lua/drover/store/*.lua $(INST)$(SHAREDIR)/lua/drover/store/
	install -m 644 lua/drover/dashboard/* $(INST)$(SHAREDIR)/lua/drover/dashboard/
	$(BUILD)/drover tools/compile_lua.lua --staged "$(STAGE)" \
	  $(addprefix $(STAGE)$(abspath $(SHAREDIR))/lua/,$(LUA_SRC:lua/%=%))
	install -m 644 backends/*.lua $(INST)$(SHAREDIR)/backends/
	install -m 644 backends/slurm/*.lua $(INST)$(SHAREDIR)/backends/slurm/
	install -m 644 docs/man/drover.1 $(INST)$(PREFIX)/share/man/man1/drover.1
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' engine/drover.pc.in \
	  > $(INST)$(LIBDIR)/pkgconfig/drover.pc

uninstall:
	rm -rf $(INST)$(PREFIX)/bin/drover $(INST)$(LIBDIR)/libdrover.* $(INST)$(LIBDIR)/drover \
	  $(INST)$(INCLUDEDIR)/drover.h $(INST)$(SHAREDIR) $(INST)$(LIBDIR)/pkgconfig/drover.pc \
	  $(INST)$(PREFIX)/share/man/man1/drover.1

# C tests (tests/c/NAME.c -> $(BUILD)/tests/NAME), linked against the static engine.
$(BUILD)/tests/%: tests/c/%.c $(BUILD)/libdrover.a $(HEADERS)
	@mkdir -p $(BUILD)/tests
	$(CC) $(CFLAGS) $(DRV_CFLAGS) -Itests/c -o $@ $< $(BUILD)/libdrover.a $(LIBS) $(LDFLAGS)

# The HTTP server the tests and benchmarks talk to (H2O on libuv).
$(BUILD)/httpd-test: tests/support/httpd.c
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS) -std=gnu99 -Wall -o $@ $< $(shell pkg-config --cflags --libs libh2o libuv) -lssl -lcrypto -lz

# A Lua interpreter carrying the sanitizer runtime itself (see tests/support/lua.c).
$(BUILD)/lua5.4: tests/support/lua.c
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS) $(shell pkg-config --cflags lua5.4) -o $@ $< -Wl,-E $(shell pkg-config --libs lua5.4) -lm -ldl $(LDFLAGS)
