/* The bytes of one element of a collective's LionCommDType, for the test programs' own
 * collectives (C and C++: tests/host/cancel.c, tests/cpp/test_wrapper.cpp). */
#ifndef LION_TEST_COMM_SIZE_H
#define LION_TEST_COMM_SIZE_H

#include <stddef.h>

#include "lion.h"

static size_t comm_size(LionCommDType dtype) {
  switch (dtype) {
    case LION_COMM_F32: return 4;
    case LION_COMM_F16: case LION_COMM_BF16: return 2;
    case LION_COMM_U64: return 8;
    default: return 1;
  }
}

#endif
