/* A minimal fork-join for the kernels: run fn(arg, tid, nthreads) on nthreads threads and wait.
 *
 * Plain pthreads rather than OpenMP: it builds with every C compiler (Apple clang has no OpenMP), and
 * the threads live only for one call, so there is no pool to break when a Python process forks
 * (GNU OpenMP's pool is not fork-safe). Starting two threads costs a few tens of microseconds,
 * which is why callers use one thread for small work.
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

#endif
