/*
 * The C SDK: the registry of tests and remote functions, the `suite` world's
 * exports, and plain-C wrappers over the bindings wit-bindgen generated from
 * guest-sdk/wit (guest-sdk/c/bindings). See matryoshka.h.
 */
#include "matryoshka.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "suite.h"

/* ---- registry ---- */

typedef struct {
    const char *name;
    mtr_test_fn fn;
    mtr_test_options options;
} test_entry;

typedef struct {
    const char *name;
    mtr_remote_fn fn;
} remote_entry;

static test_entry *tests;
static size_t test_count;
static remote_entry *remotes;
static size_t remote_count;

/* Allocation failures end the instance: a test cannot go on without memory. */
static void *xrealloc(void *p, size_t size) {
    p = realloc(p, size);
    if (p == NULL && size != 0) {
        abort();
    }
    return p;
}

static char *xstrndup(const char *s, size_t len) {
    char *copy = xrealloc(NULL, len + 1);
    memcpy(copy, s, len);
    copy[len] = '\0';
    return copy;
}

static char *vformat(const char *fmt, va_list ap) {
    va_list again;
    va_copy(again, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    char *s = xrealloc(NULL, n < 0 ? 1 : (size_t)n + 1);
    vsnprintf(s, n < 0 ? 1 : (size_t)n + 1, fmt, again);
    va_end(again);
    return s;
}

static char *format(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = vformat(fmt, ap);
    va_end(ap);
    return s;
}

void mtr_register_test(const char *name, mtr_test_fn fn, mtr_test_options options) {
    tests = xrealloc(tests, (test_count + 1) * sizeof *tests);
    tests[test_count++] = (test_entry){name, fn, options};
}

void mtr_register_remote(const char *name, mtr_remote_fn fn) {
    remotes = xrealloc(remotes, (remote_count + 1) * sizeof *remotes);
    remotes[remote_count++] = (remote_entry){name, fn};
}

/* A string of the bindings as a NUL-terminated malloc'd copy; frees the original. */
static char *take_string(suite_string_t *s) {
    char *copy = xstrndup((const char *)s->ptr, s->len);
    suite_string_free(s);
    return copy;
}

static bool string_is(const suite_string_t *s, const char *c) {
    return s->len == strlen(c) && memcmp(s->ptr, c, s->len) == 0;
}

/* ---- errors ---- */

static const char *const ERROR_KINDS[] = {
    "denied", "timeout", "io", "not-found", "invalid-argument", "level-lost", "unsupported", "internal",
};

static mtr_error last_error;
static char *last_message;
static char *last_level_path;

static void set_last_error(const char *kind, char *message, char *level_path) {
    free(last_message);
    free(last_level_path);
    last_message = message;
    last_level_path = level_path;
    last_error = (mtr_error){kind, message, level_path};
}

/* Takes a host error of the bindings as the last error. */
static void take_error(matryoshka_test_types_error_t *e) {
    const char *kind = e->kind < sizeof ERROR_KINDS / sizeof *ERROR_KINDS ? ERROR_KINDS[e->kind] : "internal";
    char *message = take_string(&e->message);
    char *level_path = take_string(&e->level_path);
    set_last_error(kind, message, level_path);
}

const mtr_error *mtr_last_error(void) {
    return &last_error;
}

void mtr_set_error(const char *kind, const char *fmt, ...) {
    const char *known = "internal";
    for (size_t i = 0; i < sizeof ERROR_KINDS / sizeof *ERROR_KINDS; i++) {
        if (strcmp(kind, ERROR_KINDS[i]) == 0) {
            known = ERROR_KINDS[i];
        }
    }
    va_list ap;
    va_start(ap, fmt);
    char *message = vformat(fmt, ap);
    va_end(ap);
    set_last_error(known, message, strdup(mtr_level_path()));
}

/* ---- failures ---- */

_Noreturn static void panic_with(const char *file, uint32_t line, char *message) {
    matryoshka_test_report_failure_t failure = {0};
    suite_string_dup(&failure.message, message);
    if (file != NULL) {
        const char *base = strrchr(file, '/');
        failure.file.is_some = true;
        suite_string_dup(&failure.file.val, base ? base + 1 : file);
        failure.line.is_some = true;
        failure.line.val = line;
    }
    matryoshka_test_report_panicked(&failure);
    /* The runner reports the failure above; the trap ends the test. */
    abort();
}

void mtr_panic_at(const char *file, uint32_t line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *message = vformat(fmt, ap);
    va_end(ap);
    panic_with(file, line, message);
}

void mtr_assert_failed(const char *file, uint32_t line, const char *expr, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *detail = vformat(fmt, ap);
    va_end(ap);
    panic_with(file, line, format("assertion `%s` failed: %s", expr, detail));
}

void mtr_assert_eq_failed(const char *file, uint32_t line, const char *expr, char *left, char *right,
                          const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *detail = vformat(fmt, ap);
    va_end(ap);
    panic_with(file, line, format("assertion `%s` failed: %s\n  left: %s\n right: %s", expr, detail, left, right));
}

void mtr_check_failed(const char *file, uint32_t line, const char *call) {
    panic_with(file, line,
               format("`%s` failed: %s at %s: %s", call, last_error.kind ? last_error.kind : "error",
                      last_error.level_path ? last_error.level_path : mtr_level_path(),
                      last_error.message ? last_error.message : "(no error recorded)"));
}

/* C's own `assert`: wasi-libc calls this when one fails. */
_Noreturn void __assert_fail(const char *expr, const char *file, int line, const char *func) {
    panic_with(file, (uint32_t)line, format("assertion `%s` failed in %s", expr, func));
}

char *mtr_format_int(long long value) {
    return format("%lld", value);
}

char *mtr_quote(const char *s) {
    return s == NULL ? strdup("NULL") : format("\"%s\"", s);
}

bool mtr_str_eq(const char *a, const char *b) {
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* ---- this level ---- */

/* The host's facts do not change during an instance: each is asked once. */
#define CACHED_STRING(fn, import)                                                     \
    const char *fn(void) {                                                            \
        static char *value;                                                           \
        if (value == NULL) {                                                          \
            suite_string_t s;                                                         \
            import(&s);                                                               \
            value = take_string(&s);                                                  \
        }                                                                             \
        return value;                                                                 \
    }

CACHED_STRING(mtr_hostname, matryoshka_test_host_hostname)
CACHED_STRING(mtr_arch, matryoshka_test_host_arch)
CACHED_STRING(mtr_level_path, matryoshka_test_host_level_path)
CACHED_STRING(mtr_component_sha256, matryoshka_test_host_component_sha256)

uint32_t mtr_level(void) {
    return matryoshka_test_host_level();
}

bool mtr_exec(const char *const *argv, const void *in, size_t in_len, mtr_output *out) {
    size_t argc = 0;
    while (argv[argc] != NULL) {
        argc++;
    }
    suite_list_string_t args = {xrealloc(NULL, (argc ? argc : 1) * sizeof(suite_string_t)), argc};
    for (size_t i = 0; i < argc; i++) {
        suite_string_dup(&args.ptr[i], argv[i]);
    }
    suite_list_u8_t input = {(uint8_t *)in, in_len};
    matryoshka_test_host_output_t result;
    matryoshka_test_host_error_t err;
    bool ok = matryoshka_test_host_exec(&args, in ? &input : NULL, &result, &err);
    suite_list_string_free(&args);
    if (!ok) {
        take_error(&err);
        return false;
    }
    *out = (mtr_output){
        .exited = result.status.is_some,
        .status = result.status.is_some ? result.status.val : -1,
        .stdout_data = xstrndup((const char *)result.stdout_.ptr, result.stdout_.len),
        .stdout_len = result.stdout_.len,
        .stderr_data = xstrndup((const char *)result.stderr_.ptr, result.stderr_.len),
        .stderr_len = result.stderr_.len,
    };
    matryoshka_test_host_output_free(&result);
    return true;
}

void mtr_output_free(mtr_output *out) {
    free(out->stdout_data);
    free(out->stderr_data);
    *out = (mtr_output){0};
}

char *mtr_check_output(const char *const *argv) {
    mtr_output out;
    if (!mtr_exec(argv, NULL, 0, &out)) {
        return NULL;
    }
    if (!out.exited || out.status != 0) {
        mtr_set_error("io", "`%s` exited with status %d: %s", argv[0], out.status, out.stderr_data);
        mtr_output_free(&out);
        return NULL;
    }
    free(out.stderr_data);
    return out.stdout_data;
}

void mtr_log(mtr_level_t level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *text = vformat(fmt, ap);
    va_end(ap);
    suite_string_t message;
    suite_string_set(&message, text);
    matryoshka_test_log_log((matryoshka_test_log_level_t)level, &message);
    free(text);
}

/* ---- other levels ---- */

struct mtr_guest {
    matryoshka_test_nest_own_guest_t own;
};

static mtr_guest *new_guest(matryoshka_test_nest_own_guest_t own) {
    mtr_guest *g = xrealloc(NULL, sizeof *g);
    g->own = own;
    return g;
}

mtr_guest *mtr_connect(const char *target) {
    suite_string_t t;
    suite_string_set(&t, target);
    matryoshka_test_nest_own_guest_t own;
    matryoshka_test_nest_error_t err;
    if (!matryoshka_test_nest_static_guest_connect(&t, &own, &err)) {
        take_error(&err);
        return NULL;
    }
    return new_guest(own);
}

mtr_guest *mtr_boot(void) {
    matryoshka_test_nest_vm_spec_t spec = {0};
    matryoshka_test_nest_own_guest_t own;
    matryoshka_test_nest_error_t err;
    if (!matryoshka_test_nest_static_guest_boot(&spec, &own, &err)) {
        take_error(&err);
        return NULL;
    }
    return new_guest(own);
}

static matryoshka_test_nest_borrow_guest_t borrow(mtr_guest *g) {
    return matryoshka_test_nest_borrow_guest(g->own);
}

char *mtr_call(mtr_guest *guest, const char *function, const char *args) {
    suite_string_t f;
    suite_string_set(&f, function);
    suite_list_u8_t a = {(uint8_t *)args, strlen(args)};
    suite_list_u8_t ret;
    matryoshka_test_nest_error_t err;
    if (!matryoshka_test_nest_method_guest_call(borrow(guest), &f, &a, NULL, &ret, &err)) {
        take_error(&err);
        return NULL;
    }
    char *out = xstrndup((const char *)ret.ptr, ret.len);
    suite_list_u8_free(&ret);
    return out;
}

uint32_t mtr_guest_level(mtr_guest *guest) {
    return matryoshka_test_nest_method_guest_level(borrow(guest));
}

char *mtr_guest_level_path(mtr_guest *guest) {
    suite_string_t s;
    matryoshka_test_nest_method_guest_level_path(borrow(guest), &s);
    return take_string(&s);
}

char *mtr_guest_arch(mtr_guest *guest) {
    suite_string_t s;
    matryoshka_test_nest_method_guest_arch(borrow(guest), &s);
    return take_string(&s);
}

void mtr_guest_close(mtr_guest *guest) {
    if (guest != NULL) {
        matryoshka_test_nest_guest_drop_own(guest->own);
        free(guest);
    }
}

/* ---- the world's exports ---- */

void exports_suite_tests(suite_list_test_case_t *ret) {
    ret->len = test_count;
    ret->ptr = xrealloc(NULL, (test_count ? test_count : 1) * sizeof *ret->ptr);
    for (size_t i = 0; i < test_count; i++) {
        const test_entry *t = &tests[i];
        matryoshka_test_types_test_case_t *c = &ret->ptr[i];
        *c = (matryoshka_test_types_test_case_t){0};
        suite_string_dup(&c->name, t->name);
        c->ignored = t->options.ignore;
        c->timeout_ms.is_some = t->options.timeout_ms != 0;
        c->timeout_ms.val = t->options.timeout_ms;
        /* Tags: the comma-separated list, split. */
        const char *p = t->options.tags;
        while (p != NULL && *p != '\0') {
            size_t n = strcspn(p, ",");
            if (n > 0) {
                c->tags.ptr = xrealloc(c->tags.ptr, (c->tags.len + 1) * sizeof *c->tags.ptr);
                suite_string_dup_n(&c->tags.ptr[c->tags.len++], p, n);
            }
            p += n + (p[n] == ',');
        }
    }
}

bool exports_suite_run(suite_string_t *name, suite_failure_t *err) {
    for (size_t i = 0; i < test_count; i++) {
        if (string_is(name, tests[i].name)) {
            suite_string_free(name);
            /* A failure does not return: it reports a panic and traps. */
            tests[i].fn();
            return true;
        }
    }
    *err = (suite_failure_t){0};
    char *message = format("no test named `%.*s` in this suite", (int)name->len, (const char *)name->ptr);
    suite_string_dup(&err->message, message);
    free(message);
    suite_string_free(name);
    return false;
}

bool exports_suite_call(suite_string_t *function, suite_list_u8_t *args, suite_list_u8_t *ret,
                        suite_error_t *err) {
    char *name = take_string(function);
    char *text = xstrndup((const char *)args->ptr, args->len);
    suite_list_u8_free(args);
    bool ok = false;
    bool found = false;
    for (size_t i = 0; i < remote_count && !found; i++) {
        if (strcmp(name, remotes[i].name) == 0) {
            found = true;
            set_last_error(NULL, NULL, NULL);
            char *result = NULL;
            ok = remotes[i].fn(text, &result);
            if (ok) {
                ret->ptr = (uint8_t *)(result ? result : strdup(""));
                ret->len = strlen((const char *)ret->ptr);
            } else if (last_error.kind == NULL) {
                mtr_set_error("internal", "`%s` returned false without mtr_set_error", name);
            }
        }
    }
    if (!found) {
        mtr_set_error("not-found", "this suite registers no remote function named `%s`", name);
    }
    if (!ok) {
        err->kind = MATRYOSHKA_TEST_TYPES_ERROR_KIND_INTERNAL;
        for (size_t k = 0; k < sizeof ERROR_KINDS / sizeof *ERROR_KINDS; k++) {
            if (strcmp(last_error.kind, ERROR_KINDS[k]) == 0) {
                err->kind = (matryoshka_test_types_error_kind_t)k;
            }
        }
        suite_string_dup(&err->message, last_error.message);
        suite_string_dup(&err->level_path, last_error.level_path);
    }
    free(name);
    free(text);
    return ok;
}
