/*
 * The relay suite in C: this same component called at the levels below.
 *
 * Each level reaches the next one with mtr_connect("local") (a child runtime on
 * the same machine; at a VM level, inside that VM). Arguments and results are
 * text: a decimal depth in, `key=value` lines or comma-separated paths out.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "matryoshka.h"

/* A malloc'd printf. */
static char *format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *format(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) {
        abort();
    }
    va_end(ap);
    return s;
}

MTR_REMOTE(whoami) {
    *result = format("caller=%s\nlevel=%u\npath=%s\narch=%s\nsha256=%s\n", args, mtr_level(),
                     mtr_level_path(), mtr_arch(), mtr_component_sha256());
    return true;
}

/* This level's path, then those of `depth` levels below, comma-separated. */
static char *descend_from_here(int depth) {
    if (depth <= 0) {
        return strdup(mtr_level_path());
    }
    mtr_guest *below = mtr_connect("local");
    if (below == NULL) {
        return NULL;
    }
    char arg[16];
    snprintf(arg, sizeof arg, "%d", depth - 1);
    char *rest = mtr_call(below, "descend", arg);
    mtr_guest_close(below);
    if (rest == NULL) {
        return NULL;
    }
    char *paths = format("%s,%s", mtr_level_path(), rest);
    free(rest);
    return paths;
}

MTR_REMOTE(descend) {
    char *end;
    long depth = strtol(args, &end, 10);
    if (*args == '\0' || *end != '\0') {
        mtr_set_error("invalid-argument", "descend wants a decimal depth, not `%s`", args);
        return false;
    }
    *result = descend_from_here((int)depth);
    if (*result == NULL) {
        /* Pass the error of the level below on. */
        const mtr_error *e = mtr_last_error();
        mtr_set_error(e->kind, "%s", e->message);
        return false;
    }
    return true;
}

MTR_TEST(calls_itself_one_level_down) {
    mtr_guest *below;
    MTR_CHECK(below = mtr_connect("local"));
    char *hop;
    MTR_CHECK(hop = mtr_call(below, "whoami", mtr_level_path()));
    char *want = format("caller=%s\nlevel=%u\npath=%s/L%u\narch=%s\nsha256=%s\n", mtr_level_path(),
                        mtr_level() + 1, mtr_level_path(), mtr_level() + 1, mtr_arch(),
                        mtr_component_sha256());
    MTR_ASSERT_EQ_STR(hop, want, "what the level below says of itself");
    char *arch = mtr_guest_arch(below);
    MTR_ASSERT_EQ_STR(arch, mtr_arch(), "the handle's arch");
    MTR_ASSERT_EQ_INT(mtr_guest_level(below), mtr_level() + 1, "the handle's level");
    free(arch);
    free(want);
    free(hop);
    mtr_guest_close(below);
}

MTR_TEST(descends_two_levels) {
    char *paths;
    MTR_CHECK(paths = descend_from_here(2));
    const char *here = mtr_level_path();
    uint32_t level = mtr_level();
    char *want = format("%s,%s/L%u,%s/L%u/L%u", here, here, level + 1, here, level + 1, level + 2);
    MTR_ASSERT_EQ_STR(paths, want, "the paths of the levels below");
    free(want);
    free(paths);
}

MTR_TEST(an_unknown_remote_function_is_not_found) {
    mtr_guest *below;
    MTR_CHECK(below = mtr_connect("local"));
    char *out = mtr_call(below, "no_such_function", "");
    MTR_ASSERT(out == NULL, "calling an unknown function succeeded: %s", out);
    MTR_ASSERT_EQ_STR(mtr_last_error()->kind, "not-found", "the error's kind");
    mtr_guest_close(below);
}
