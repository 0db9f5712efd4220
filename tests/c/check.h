/* A tiny assertion helper for the C tests: counts checks, reports each failure with its line,
 * and ends with the "N passed, N failed" line the test driver reads. */
#ifndef LION_TEST_CHECK_H
#define LION_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

static int checks_passed = 0;
static int checks_failed = 0;

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (cond) {                                                                 \
      checks_passed++;                                                          \
    } else {                                                                    \
      checks_failed++;                                                          \
      fprintf(stderr, "%s:%d: CHECK(%s) failed; lion_last_error: \"%s\"\n",     \
              __FILE__, __LINE__, #cond, lion_last_error());                    \
    }                                                                           \
  } while (0)

/* The status, and a message that is not empty, on failure; an empty message on success. */
#define CHECK_STATUS(call, want)                                                \
  do {                                                                          \
    LionStatus got_ = (call);                                                   \
    CHECK(got_ == (want));                                                      \
    if (got_ != (want)) fprintf(stderr, "  %s returned %d, want %d\n", #call,   \
                                (int)got_, (int)(want));                        \
    CHECK(lion_last_error() != NULL);                                           \
    CHECK(((want) == LION_OK) == (lion_last_error()[0] == '\0'));               \
  } while (0)

static int check_report(const char *name) {
  printf("%s: %d passed, %d failed\n", name, checks_passed, checks_failed);
  return checks_failed == 0 ? 0 : 1;
}

#endif
