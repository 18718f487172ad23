/* A minimal fork-join for the kernels: run fn(arg, tid, nthreads) on nthreads threads and wait.
 *
 * Plain pthreads rather than OpenMP: it builds with every C compiler (Apple clang has no OpenMP).
 * The worker threads are started on first use and then kept, waiting, between calls, as OpenBLAS
 * keeps its own: a thread created for each call is often placed on the caller's busy core and runs
 * there, sharing it, for milliseconds until the scheduler moves it (measured: 2-thread GEMMs at
 * 0.5-0.8x their speed in one call of three), while a waiting worker is woken on the core it last ran on.
 * The pool is fork-safe: a child process (whose copy has no worker threads) starts its own.
 */
#ifndef LLAMA3NP_PARALLEL_H
#define LLAMA3NP_PARALLEL_H

#include <pthread.h>

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n;      /* threads taking part */
    int count;  /* how many have arrived in the current phase */
    int phase;  /* bumped when the last one arrives */
} barrier_t;

/* Wait until all n threads of the team have called barrier_wait (the same n as parallel_run's). */
void barrier_wait(barrier_t *b);

/* Run fn(arg, tid, nthreads, barrier) for tid = 0..nthreads-1, tid 0 on the calling thread.
 * If the OS refuses to start a thread, the team is smaller: fn always sees the real nthreads.
 * Returns the number of threads that ran. */
int parallel_run(int nthreads, void (*fn)(void *arg, int tid, int nthreads, barrier_t *barrier), void *arg);

/* The same for work that the caller can finish alone (fn takes its tasks from a shared counter and never
 * waits at the barrier): a helper that has not started by the time the caller's fn returns is dropped
 * instead of waited for. On a machine whose other cores are busy a woken thread may wait milliseconds
 * for a core, which for a GEMV of ~50 us would cost far more than it saves. Returns the number of threads
 * that ran fn (at least 1). */
int parallel_run_helpers(int nthreads, void (*fn)(void *arg, int tid, int nthreads, barrier_t *barrier), void *arg);

#endif
