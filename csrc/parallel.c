/* Fork-join threads for the kernels (see parallel.h for why not OpenMP). */
#include "parallel.h"

#include <stdlib.h>

#define MAX_THREADS 256

/* a hint to the CPU that we are spinning (lets the other hyperthread run, saves power) */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

#define SPIN_ITERATIONS 20000 /* ~50-100 us of pause instructions before going to sleep */

void barrier_wait(barrier_t *b) {
    if (b->n <= 1) return;
    int phase = __atomic_load_n(&b->phase, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == b->n) {
        /* the last thread to arrive opens the gate for the others */
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        pthread_mutex_lock(&b->mu);
        __atomic_store_n(&b->phase, phase + 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&b->cv);
        pthread_mutex_unlock(&b->mu);
        return;
    }
    /* Spin a little first: the others usually arrive within microseconds, and a thread that went to
     * sleep must wait for the scheduler to run it again, which on a busy machine takes milliseconds. */
    for (int i = 0; i < SPIN_ITERATIONS; i++) {
        if (__atomic_load_n(&b->phase, __ATOMIC_ACQUIRE) != phase) return;
        cpu_relax();
    }
    pthread_mutex_lock(&b->mu);
    while (__atomic_load_n(&b->phase, __ATOMIC_ACQUIRE) == phase) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
}

typedef struct {
    void (*fn)(void *, int, int, barrier_t *);
    void *arg;
    barrier_t barrier;
    /* the start gate: workers wait here until the team size is final */
    int started, nthreads;
} team_t;

typedef struct {
    team_t *team;
    int tid;
} worker_t;

static void *worker_main(void *p) {
    worker_t *w = (worker_t *)p;
    team_t *team = w->team;
    pthread_mutex_lock(&team->barrier.mu);
    while (!team->started) pthread_cond_wait(&team->barrier.cv, &team->barrier.mu);
    int nthreads = team->nthreads;
    pthread_mutex_unlock(&team->barrier.mu);
    team->fn(team->arg, w->tid, nthreads, &team->barrier);
    return NULL;
}

int parallel_run(int nthreads, void (*fn)(void *, int, int, barrier_t *), void *arg) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads <= 1) {
        barrier_t single = {.n = 1};
        fn(arg, 0, 1, &single);
        return 1;
    }
    team_t team = {.fn = fn, .arg = arg};
    pthread_mutex_init(&team.barrier.mu, NULL);
    pthread_cond_init(&team.barrier.cv, NULL);
    pthread_t threads[MAX_THREADS];
    worker_t workers[MAX_THREADS];
    int n = 1;  /* thread 0 is us */
    for (; n < nthreads; n++) {
        workers[n].team = &team;
        workers[n].tid = n;
        if (pthread_create(&threads[n], NULL, worker_main, &workers[n]) != 0) break;
    }
    /* the team is complete: tell the workers its size and let them go */
    pthread_mutex_lock(&team.barrier.mu);
    team.nthreads = n;
    team.barrier.n = n;
    team.started = 1;
    pthread_cond_broadcast(&team.barrier.cv);
    pthread_mutex_unlock(&team.barrier.mu);
    fn(arg, 0, n, &team.barrier);
    for (int t = 1; t < n; t++) pthread_join(threads[t], NULL);
    pthread_cond_destroy(&team.barrier.cv);
    pthread_mutex_destroy(&team.barrier.mu);
    return n;
}
