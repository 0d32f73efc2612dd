/*
 * The basics suite in C: the same tests, with the same outcomes, as the Rust,
 * Python and JavaScript ones (runtime/tests/test_languages.rs compares them).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "matryoshka.h"

static const char *const KNOWN_ARCHES[] = {"x86_64", "aarch64", "s390x", "ppc64le", "riscv64"};

/* `s` without its trailing newline (in place). */
static char *chomp(char *s) {
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r')) {
        s[--n] = '\0';
    }
    return s;
}

MTR_TEST(hostname_is_set) {
    const char *name = mtr_hostname();
    mtr_log(MTR_INFO, "hostname is %s", name);
    MTR_ASSERT(name[0] != '\0', "hostname is empty");
}

MTR_TEST(arch_is_known) {
    const char *arch = mtr_arch();
    bool known = false;
    for (size_t i = 0; i < sizeof KNOWN_ARCHES / sizeof *KNOWN_ARCHES; i++) {
        known = known || strcmp(arch, KNOWN_ARCHES[i]) == 0;
    }
    MTR_ASSERT(known, "unexpected arch %s", arch);
}

MTR_TEST(level_path_matches_level) {
    const char *path = mtr_level_path();
    uint32_t depth = 1;
    for (const char *p = path; *p; p++) {
        depth += *p == '/';
    }
    MTR_ASSERT_EQ_INT(depth, mtr_level() + 1, "level path %s", path);
    MTR_ASSERT(strncmp(path, "L0", 2) == 0, "level path %s", path);
}

MTR_TEST_WITH(exec_uname_matches_arch, .tags = "exec") {
    const char *argv[] = {"uname", "-m", NULL};
    char *out;
    MTR_CHECK(out = mtr_check_output(argv));
    MTR_ASSERT_EQ_STR(chomp(out), mtr_arch(), "`uname -m`");
    free(out);
}

MTR_TEST_WITH(exec_hostname_matches_host, .tags = "exec") {
    const char *argv[] = {"hostname", NULL};
    char *out;
    MTR_CHECK(out = mtr_check_output(argv));
    MTR_ASSERT_EQ_STR(chomp(out), mtr_hostname(), "`hostname`");
    free(out);
}

MTR_TEST_WITH(exec_feeds_stdin, .tags = "exec") {
    enum { N = 200000 };
    static unsigned char input[N];
    for (size_t i = 0; i < N; i++) {
        input[i] = (unsigned char)(i % 256);
    }
    const char *argv[] = {"cat", NULL};
    mtr_output out;
    MTR_CHECK(mtr_exec(argv, input, N, &out));
    MTR_ASSERT(out.exited && out.status == 0, "status %d: %s", out.status, out.stderr_data);
    MTR_ASSERT_EQ_INT(out.stdout_len, N, "bytes that came back");
    MTR_ASSERT(memcmp(out.stdout_data, input, N) == 0, "`cat` gave back other bytes than it was fed");
    mtr_output_free(&out);
}

MTR_TEST_WITH(fs_read_via_preopen, .tags = "fs") {
    FILE *f = fopen("/data/hello.txt", "r");
    MTR_ASSERT(f != NULL, "/data/hello.txt: %s", strerror(errno));
    char text[64] = {0};
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    MTR_ASSERT_EQ_INT(n, strlen("hello from the host\n"), "bytes read");
    MTR_ASSERT_EQ_STR(text, "hello from the host\n", "/data/hello.txt");
}

MTR_TEST_WITH(fs_preopen_is_read_only, .tags = "fs") {
    FILE *r = fopen("/data/hello.txt", "r");
    MTR_ASSERT(r != NULL, "/data is not preopened: %s", strerror(errno));
    fclose(r);
    FILE *w = fopen("/data/written-by-guest.txt", "w");
    MTR_ASSERT(w == NULL, "a read-only preopen accepted a write");
    MTR_ASSERT(errno == EPERM || errno == EACCES || errno == EROFS || errno == ENOTCAPABLE,
               "write refused for another reason: %s", strerror(errno));
    MTR_ASSERT(access("/data/written-by-guest.txt", F_OK) != 0, "the refused write left a file");
}

MTR_TEST(prints_and_logs) {
    printf("to stdout from %s\n", mtr_level_path());
    fflush(stdout);
    mtr_log(MTR_WARN, "a warning line");
}

MTR_TEST(clocks_and_random_work) {
    struct timespec now, start, end;
    clock_gettime(CLOCK_REALTIME, &now);
    MTR_ASSERT(now.tv_sec > 1600000000, "wall clock at %lld", (long long)now.tv_sec);
    clock_gettime(CLOCK_MONOTONIC, &start);
    struct timespec nap = {.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
    nanosleep(&nap, NULL);
    clock_gettime(CLOCK_MONOTONIC, &end);
    long long slept_ms = (end.tv_sec - start.tv_sec) * 1000LL + (end.tv_nsec - start.tv_nsec) / 1000000;
    MTR_ASSERT(slept_ms >= 20 && slept_ms < 5000, "a 20 ms sleep took %lld ms", slept_ms);
    unsigned char first[32], second[32], zeros[32] = {0};
    MTR_ASSERT(getentropy(first, sizeof first) == 0 && getentropy(second, sizeof second) == 0,
               "getentropy: %s", strerror(errno));
    MTR_ASSERT(memcmp(first, second, sizeof first) != 0, "two draws of wasi:random gave the same bytes");
    MTR_ASSERT(memcmp(first, zeros, sizeof first) != 0, "wasi:random gave only zeros");
}

MTR_TEST_WITH(deliberately_fails, .tags = "expected-failure") {
    int two = 1 + 1;
    MTR_ASSERT_EQ_INT(two, 3, "arithmetic at %s", mtr_level_path());
}

MTR_TEST_WITH(ignored_by_default, .ignore = true) {
    mtr_panic_at(__FILE__, __LINE__, "ignored tests run only with --ignored or --include-ignored");
}
