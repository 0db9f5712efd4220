/*
 * A stand-in for libnccl.so.2, for liblion's tests on machines without NCCL or a GPU
 * (tests/nccl_fake.rs). It exports the functions liblion resolves, with nccl.h's signatures,
 * and acts as a world of one rank on host memory (a collective copies send to recv), plus
 * fake_* functions through which the tests steer and observe it. It never communicates.
 *
 * Built as a shared library with -DFAKE_VERSION=<NCCL_VERSION_CODE>; -DFAKE_OMIT_ALLGATHER
 * leaves ncclAllGather out, -DFAKE_NO_LAST_ERROR leaves ncclGetLastError out (pre-2.13).
 * Not thread-safe: the tests that use it run one at a time.
 */
#define _GNU_SOURCE /* RTLD_NOLOAD */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int ncclResult_t;
typedef struct {
  char internal[128];
} ncclUniqueId;

struct fakeComm {
  int nranks, rank, device;
  ncclResult_t async;  /* what ncclCommGetAsyncError reports, once in_progress is spent */
  int in_progress;     /* how many more times ncclCommGetAsyncError says ncclInProgress */
};
typedef struct fakeComm *ncclComm_t;

static int destroyed, aborted, group_depth, unique_ids, next_device;
static ncclResult_t fail_next;
static unsigned char last_id[128];
static char last_call[32];
static size_t last_count;
static int last_dtype, last_op;
static void *last_stream;

ncclResult_t ncclGetVersion(int *version) {
  /* A slow load (tests/host/fork_init.c), as a real one's can be. */
  const char *delay = getenv("LION_FAKE_NCCL_VERSION_DELAY_MS");
  if (delay && *delay) usleep((useconds_t)atoi(delay) * 1000);
  *version = FAKE_VERSION;
  return 0;
}

/* Byte i of the n-th id (from 0) is i + n. */
ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
  int i;
  for (i = 0; i < 128; i++) id->internal[i] = (char)(unsigned char)(i + unique_ids);
  unique_ids++;
  return 0;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
  struct fakeComm *c;
  memcpy(last_id, id.internal, 128);
  *comm = NULL;
  if (nranks != 1 || rank != 0) return 4; /* ncclInvalidArgument: a world of one only */
  c = calloc(1, sizeof *c);
  if (!c) return 2;
  c->nranks = 1;
  c->device = next_device;
  *comm = c;
  return 0;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  destroyed++;
  free(comm);
  return 0;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  aborted++;
  free(comm);
  return 0;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) {
  *count = comm->nranks;
  return 0;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) {
  *rank = comm->rank;
  return 0;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device) {
  *device = comm->device;
  return 0;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *async_error) {
  if (comm->in_progress > 0) {
    comm->in_progress--;
    *async_error = 7; /* ncclInProgress */
  } else {
    *async_error = comm->async;
  }
  return 0;
}

const char *ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case 0: return "no error";
    case 2: return "unhandled system error";
    case 4: return "invalid argument";
    case 6: return "remote process exited or there was a network error";
    case 7: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

#ifndef FAKE_NO_LAST_ERROR
const char *ncclGetLastError(ncclComm_t comm) {
  (void)comm;
  return "fake: the last error";
}
#endif

static size_t dtype_size(int dtype) {
  switch (dtype) {
    case 0: case 1: return 1;           /* ncclInt8, ncclUint8 */
    case 2: case 3: return 4;           /* ncclInt32, ncclUint32 */
    case 4: case 5: case 8: return 8;   /* ncclInt64, ncclUint64, ncclFloat64 */
    case 6: case 9: return 2;           /* ncclFloat16, ncclBfloat16 */
    case 7: return 4;                   /* ncclFloat32 */
    default: return 0;
  }
}

/* A collective runs in its stream's order: where the fake CUDA driver of tests/c/fake_cuda.c
 * is loaded, the legacy stream's work it holds lands first unless the stream is non-blocking
 * (its `fake_cuda_order_on`), as a real collective queued after it would see it. */
static void order_on(void *stream) {
  static void (*hook)(void *);
  static int looked;
  if (!looked) {
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (cuda) *(void **)&hook = dlsym(cuda, "fake_cuda_order_on");
    looked = 1;
  }
  if (hook) hook(stream);
}

static ncclResult_t collective(const char *name, const void *send, void *recv, size_t count,
                               int dtype, int op, ncclComm_t comm, void *stream) {
  ncclResult_t result = fail_next;
  size_t length = strlen(name);
  if (length > sizeof last_call - 1) length = sizeof last_call - 1;
  memcpy(last_call, name, length);
  last_call[length] = 0;
  last_count = count;
  last_dtype = dtype;
  last_op = op;
  last_stream = stream;
  fail_next = 0;
  if (result != 0 && result != 7) return result;
  if (dtype_size(dtype) == 0 || op != 0) return 4;
  order_on(stream);
  memcpy(recv, send, count * dtype_size(dtype));
  /* ncclInProgress: done, but the communicator says so only after two more questions. */
  if (result == 7) comm->in_progress = 2;
  return result;
}

ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, int dtype, int op,
                           ncclComm_t comm, void *stream) {
  return collective("ncclAllReduce", send, recv, count, dtype, op, comm, stream);
}

ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t count, int dtype, int op,
                               ncclComm_t comm, void *stream) {
  return collective("ncclReduceScatter", send, recv, count, dtype, op, comm, stream);
}

#ifndef FAKE_OMIT_ALLGATHER
ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, int dtype,
                           ncclComm_t comm, void *stream) {
  return collective("ncclAllGather", send, recv, count, dtype, 0, comm, stream);
}
#endif

ncclResult_t ncclGroupStart(void) {
  group_depth++;
  return 0;
}

ncclResult_t ncclGroupEnd(void) {
  group_depth--;
  return 0;
}

/* ---- For the tests ---- */

/* Communicators destroyed and aborted, the group depth, the ids made. */
void fake_counts(int out[4]) {
  out[0] = destroyed;
  out[1] = aborted;
  out[2] = group_depth;
  out[3] = unique_ids;
}

/* The id the last ncclCommInitRank was given. */
void fake_last_id(unsigned char out[128]) { memcpy(out, last_id, 128); }

/* The last collective: its name, count, ncclDataType_t, ncclRedOp_t and stream. */
void fake_last_call(char name[32], size_t *count, int *dtype, int *op, void **stream) {
  memcpy(name, last_call, 32);
  *count = last_count;
  *dtype = last_dtype;
  *op = last_op;
  *stream = last_stream;
}

/* Makes ncclCommGetAsyncError say ncclInProgress `in_progress` times, then `code`. */
void fake_set_async(ncclComm_t comm, ncclResult_t code, int in_progress) {
  comm->async = code;
  comm->in_progress = in_progress;
}

/* How many more times ncclCommGetAsyncError will say ncclInProgress. */
int fake_in_progress(ncclComm_t comm) { return comm->in_progress; }

/* The next collective returns `code` without copying; ncclInProgress (7) copies, and makes
 * ncclCommGetAsyncError say ncclInProgress twice more. */
void fake_fail_next(ncclResult_t code) { fail_next = code; }

/* The CUDA device of the communicators made from now on. */
void fake_set_device(int device) { next_device = device; }
