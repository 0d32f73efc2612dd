/*
 * Write matryoshka test suites in C.
 *
 * A suite is a C file of test functions declared with MTR_TEST (and functions
 * other levels may call, declared with MTR_REMOTE); guest-sdk/build.sh compiles
 * it with this SDK and the bindings generated from guest-sdk/wit into a
 * component of the `matryoshka:test/suite` world.
 *
 *     #include "matryoshka.h"
 *
 *     MTR_TEST(hostname_is_set) {
 *         MTR_ASSERT(mtr_hostname()[0] != '\0', "hostname is empty");
 *     }
 *
 *     MTR_TEST_WITH(slow_one, .ignore = true, .timeout_ms = 600000, .tags = "slow") {
 *         ...
 *     }
 *
 *     MTR_REMOTE(echo) {            // const char *args in, char **result out
 *         *result = strdup(args);
 *         return true;
 *     }
 *
 * A failed MTR_ASSERT*, MTR_CHECK or C `assert` fails the test as a panic with
 * its message and file:line. stdout and stderr (printf) are captured per test;
 * mtr_log writes the runtime's structured log. Arguments and results of remote
 * calls are NUL-terminated text: encode them as you like (the tests here use
 * decimal numbers and `key=value` lines).
 *
 * Host calls that can fail return false or NULL and leave the reason in
 * mtr_last_error(); strings they return are owned by the caller unless said
 * otherwise.
 */
#ifndef MATRYOSHKA_H
#define MATRYOSHKA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- tests and remote functions ---- */

/** The options of one test; zero is the default for each. */
typedef struct {
    /** Runs only with --ignored or --include-ignored. */
    bool ignore;
    /** Wall-clock limit in ms; 0 for the runner's default. */
    uint64_t timeout_ms;
    /** Comma-separated tags, or NULL. */
    const char *tags;
} mtr_test_options;

/** A test body. */
typedef void (*mtr_test_fn)(void);
/** A remote function: `args` in; on success sets `*result` (malloc'd) and returns true. */
typedef bool (*mtr_remote_fn)(const char *args, char **result);

/** Registers a test (MTR_TEST does this before the suite is listed). */
void mtr_register_test(const char *name, mtr_test_fn fn, mtr_test_options options);
/** Registers a remote function (MTR_REMOTE does this). */
void mtr_register_remote(const char *name, mtr_remote_fn fn);

/** Declares the test `name` with options, e.g. `MTR_TEST_WITH(t, .ignore = true)`. */
#define MTR_TEST_WITH(name, ...)                                                      \
    static void name(void);                                                           \
    __attribute__((constructor)) static void mtr_register_test_##name(void) {         \
        mtr_register_test(#name, name, (mtr_test_options){__VA_ARGS__});              \
    }                                                                                 \
    static void name(void)

/** Declares the test `name` with the default options. */
#define MTR_TEST(name) MTR_TEST_WITH(name, .ignore = false)

/** Declares the remote function `name(const char *args, char **result)`. */
#define MTR_REMOTE(name)                                                              \
    static bool name(const char *args, char **result);                               \
    __attribute__((constructor)) static void mtr_register_remote_##name(void) {       \
        mtr_register_remote(#name, name);                                             \
    }                                                                                 \
    static bool name(const char *args, char **result)

/* ---- failures ---- */

/** Fails the running test as a panic with a printf-style message at file:line. */
_Noreturn void mtr_panic_at(const char *file, uint32_t line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/** Fails the test unless `cond` holds; the message is printf-style. */
#define MTR_ASSERT(cond, ...)                                                         \
    do {                                                                              \
        if (!(cond)) {                                                                \
            mtr_assert_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);                \
        }                                                                             \
    } while (0)

/** Fails the test unless the integers are equal, showing both. */
#define MTR_ASSERT_EQ_INT(left, right, ...)                                           \
    do {                                                                              \
        long long mtr_l_ = (long long)(left), mtr_r_ = (long long)(right);            \
        if (mtr_l_ != mtr_r_) {                                                       \
            mtr_assert_eq_failed(__FILE__, __LINE__, #left " == " #right,             \
                                 mtr_format_int(mtr_l_), mtr_format_int(mtr_r_),      \
                                 __VA_ARGS__);                                        \
        }                                                                             \
    } while (0)

/** Fails the test unless the strings are equal, showing both. */
#define MTR_ASSERT_EQ_STR(left, right, ...)                                           \
    do {                                                                              \
        const char *mtr_l_ = (left), *mtr_r_ = (right);                               \
        if (!mtr_str_eq(mtr_l_, mtr_r_)) {                                            \
            mtr_assert_eq_failed(__FILE__, __LINE__, #left " == " #right,             \
                                 mtr_quote(mtr_l_), mtr_quote(mtr_r_), __VA_ARGS__);  \
        }                                                                             \
    } while (0)

/** Fails the test when a host call returned false or NULL, with mtr_last_error(). */
#define MTR_CHECK(call)                                                               \
    do {                                                                              \
        if (!(call)) {                                                                \
            mtr_check_failed(__FILE__, __LINE__, #call);                              \
        }                                                                             \
    } while (0)

/* Support of the macros above. */
_Noreturn void mtr_assert_failed(const char *file, uint32_t line, const char *expr,
                                 const char *fmt, ...) __attribute__((format(printf, 4, 5)));
_Noreturn void mtr_assert_eq_failed(const char *file, uint32_t line, const char *expr,
                                    char *left, char *right, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
_Noreturn void mtr_check_failed(const char *file, uint32_t line, const char *call);
char *mtr_format_int(long long value);
char *mtr_quote(const char *s);
bool mtr_str_eq(const char *a, const char *b);

/* ---- errors ---- */

/** Why the last host call that returned false or NULL failed. */
typedef struct {
    /** The error kind as WIT spells it: "denied", "timeout", "io", "not-found", ... */
    const char *kind;
    /** What to do next. */
    const char *message;
    /** Where it happened, e.g. "L0/L1". */
    const char *level_path;
} mtr_error;

/** The last error (valid until the next failing call). */
const mtr_error *mtr_last_error(void);
/** From a remote function: the error to return to the caller (then return false). */
void mtr_set_error(const char *kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- this level ---- */

/** The host name of this level (owned by the SDK). */
const char *mtr_hostname(void);
/** The architecture, as `uname -m` prints it (owned by the SDK). */
const char *mtr_arch(void);
/** The nesting depth: 0 where the run started. */
uint32_t mtr_level(void);
/** The level path, e.g. "L0/L1" (owned by the SDK). */
const char *mtr_level_path(void);
/** Hex sha256 of this component, as this level's runtime computed it (owned by the SDK). */
const char *mtr_component_sha256(void);

/** What a finished command produced. */
typedef struct {
    /** Whether it exited (false: killed by a signal). */
    bool exited;
    /** Its exit status, when it exited. */
    int32_t status;
    /** Standard output (NUL-terminated for convenience; `stdout_len` bytes). */
    char *stdout_data;
    size_t stdout_len;
    /** Standard error (NUL-terminated; `stderr_len` bytes). */
    char *stderr_data;
    size_t stderr_len;
} mtr_output;

/** Runs the NULL-terminated `argv` here (needs --grant exec=argv[0]), feeding it `in`. */
bool mtr_exec(const char *const *argv, const void *in, size_t in_len, mtr_output *out);
/** Frees what mtr_exec filled in. */
void mtr_output_free(mtr_output *out);
/** Runs `argv` and returns its stdout (malloc'd); NULL with an error when it fails or exits non-zero. */
char *mtr_check_output(const char *const *argv);

/** Severity of a log line. */
typedef enum { MTR_TRACE, MTR_DEBUG, MTR_INFO, MTR_WARN, MTR_ERROR } mtr_level_t;
/** Writes one printf-style line to the runtime's structured log. */
void mtr_log(mtr_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- other levels ---- */

/** Another level, running this same component (needs --grant nest). */
typedef struct mtr_guest mtr_guest;

/** Reaches "local" (a child runtime here) or "ssh://user@host[:port]"; NULL on error. */
mtr_guest *mtr_connect(const char *target);
/** Boots a VM as the next level with the runtime's defaults; NULL on error. */
mtr_guest *mtr_boot(void);
/** Calls the remote function `function` there; its result (malloc'd), or NULL on error. */
char *mtr_call(mtr_guest *guest, const char *function, const char *args);
/** The depth of that level. */
uint32_t mtr_guest_level(mtr_guest *guest);
/** The level path of that level (malloc'd). */
char *mtr_guest_level_path(mtr_guest *guest);
/** The architecture of that level (malloc'd). */
char *mtr_guest_arch(mtr_guest *guest);
/** Lets the level go (a booted VM is shut down). */
void mtr_guest_close(mtr_guest *guest);

#endif
