/* Fork-join threads for the kernels (see parallel.h for why a kept pool and not OpenMP). */
#include "parallel.h"

#include <sched.h>
#include <signal.h>
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

#define SPIN_ITERATIONS 20000 /* ~50-400 us of pause instructions before going to sleep */

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

typedef void (*team_fn)(void *, int, int, barrier_t *);

/* Spin on *word until it differs from `seen` (or SPIN_ITERATIONS pass); returns its value. A worker
 * waiting for work yields its core now and then: on a machine whose cores are all busy, a worker that
 * only spun would take a share of a core from the thread that will post the work (measured, 2 cores,
 * one busy with another process: 2-thread decode steps 0.43-0.54x as fast as 1-thread ones; yielding
 * every 64 spins, 1.00-1.01x). */
static long spin_while_equal(const long *word, long seen) {
    long v = seen;
    for (int i = 0; i < SPIN_ITERATIONS && v == seen; i++) {
        if (i % 64 == 63) sched_yield(); else cpu_relax();
        v = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    }
    return v;
}

/* Spin until *word is `value` (or SPIN_ITERATIONS pass); returns whether it is. */
static int spin_until(const long *word, long value) {
    for (int i = 0; i < SPIN_ITERATIONS; i++) {
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == value) return 1;
        cpu_relax();
    }
    return __atomic_load_n(word, __ATOMIC_ACQUIRE) == value;
}

/* ---------------------------------------------------------------------------------------------- */
/* The pool. Worker w (1..size) waits until its own counter posted[w] moves, claims its part, runs  */
/* the posted team's fn as tid w and marks its part done; the caller is tid 0 and waits for them.   */
/* A worker reads the team only after its own counter moved, so a call with fewer threads than the  */
/* pool leaves the other workers asleep and untouched.                                             */

/* A worker's part in the call in progress. The caller marks it POSTED before waking the worker; the
 * worker claims it (POSTED -> RUNNING) before it reads the call, and marks it DONE after. A call whose
 * helpers are optional (parallel_run_helpers) drops a part still POSTED when the caller has finished
 * (POSTED -> DROPPED): that worker has not started, and when it does it finds nothing to do. */
enum { PART_POSTED = 1, PART_RUNNING, PART_DONE, PART_DROPPED };

static struct {
    pthread_mutex_t busy;  /* held for a whole call; a concurrent call uses threads of its own */
    pthread_mutex_t mu;    /* guards the sleeps below */
    pthread_cond_t work, done;
    int size;              /* workers running */
    long posted[MAX_THREADS];
    long part[MAX_THREADS];
    /* the call in progress */
    team_fn fn;
    void *arg;
    int nthreads;
    barrier_t barrier;
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .work = PTHREAD_COND_INITIALIZER,
        .done = PTHREAD_COND_INITIALIZER};

static void *pool_worker(void *p) {
    const int tid = (int)(long)p;
    long seen = 0;
    for (;;) {
        long v = spin_while_equal(&pool.posted[tid], seen);
        if (v == seen) {
            pthread_mutex_lock(&pool.mu);
            while ((v = __atomic_load_n(&pool.posted[tid], __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&pool.work, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = v;
        /* a worker late for a call whose helpers were optional may find its part dropped: the caller
         * has moved on, and the call's fields may already be the next call's */
        long posted = PART_POSTED;
        if (!__atomic_compare_exchange_n(&pool.part[tid], &posted, PART_RUNNING, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        pool.fn(pool.arg, tid, pool.nthreads, &pool.barrier);
        __atomic_store_n(&pool.part[tid], PART_DONE, __ATOMIC_RELEASE);
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.done);
        pthread_mutex_unlock(&pool.mu);
    }
    return NULL;
}

/* In a forked child the workers do not exist (only the forking thread is copied): forget them, and
 * re-create the locks, which another thread of the parent may have held at the fork. */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_mutex_init(&pool.barrier.mu, NULL);
    pthread_cond_init(&pool.barrier.cv, NULL);
    pool.size = 0;
    for (int t = 0; t < MAX_THREADS; t++) pool.posted[t] = pool.part[t] = 0;
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_init(void) {
    pthread_atfork(NULL, NULL, pool_after_fork_in_child);
    pthread_mutex_init(&pool.barrier.mu, NULL);
    pthread_cond_init(&pool.barrier.cv, NULL);
}

/* Start workers until there are `want` (fewer if the OS refuses); returns how many there are.
 * Workers block every signal, so that signals (Ctrl-C) go to the Python thread, as before. */
static int pool_grow(int want) {
    if (pool.size >= want) return pool.size;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (pool.size < want) {
        int tid = pool.size + 1;
        pool.posted[tid] = 0;
        pthread_t thread;
        if (pthread_create(&thread, &attr, pool_worker, (void *)(long)tid) != 0) break;
        pool.size++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.size;
}

/* ---------------------------------------------------------------------------------------------- */
/* Threads of its own for a call that finds the pool busy (two Python threads in the kernels at    */
/* once: cffi releases the GIL): started for this call and joined at its end.                     */

typedef struct {
    team_fn fn;
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

static int run_own_threads(int nthreads, team_fn fn, void *arg) {
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

/* Run fn on n threads of the pool (or of its own if the pool is busy); with `optional`, the helpers
 * that have not started when the caller's fn returns are dropped. */
static int run(int nthreads, team_fn fn, void *arg, int optional) {
    if (nthreads > MAX_THREADS - 1) nthreads = MAX_THREADS - 1;
    if (nthreads <= 1) {
        barrier_t single = {.n = 1};
        fn(arg, 0, 1, &single);
        return 1;
    }
    pthread_once(&pool_once, pool_init);
    if (pthread_mutex_trylock(&pool.busy) != 0) return run_own_threads(nthreads, fn, arg);
    int n = 1 + pool_grow(nthreads - 1);
    if (n > nthreads) n = nthreads;
    pool.fn = fn;
    pool.arg = arg;
    pool.nthreads = n;
    pool.barrier.n = n;
    pool.barrier.count = 0;
    /* the call's fields are written before each worker's part is posted (release / acquire) */
    for (int t = 1; t < n; t++) {
        __atomic_store_n(&pool.part[t], PART_POSTED, __ATOMIC_RELEASE);
        __atomic_add_fetch(&pool.posted[t], 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.mu);
    fn(arg, 0, n, &pool.barrier);
    int ran = n;
    for (int t = 1; t < n; t++) {
        long posted = PART_POSTED;
        if (optional && __atomic_compare_exchange_n(&pool.part[t], &posted, PART_DROPPED, 0, __ATOMIC_ACQ_REL,
                                                    __ATOMIC_ACQUIRE)) {
            ran--;
            continue;
        }
        if (!spin_until(&pool.part[t], PART_DONE)) { /* spin for it first, then sleep */
            pthread_mutex_lock(&pool.mu);
            while (__atomic_load_n(&pool.part[t], __ATOMIC_ACQUIRE) != PART_DONE) pthread_cond_wait(&pool.done, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    pthread_mutex_unlock(&pool.busy);
    return ran;
}

int parallel_run(int nthreads, team_fn fn, void *arg) { return run(nthreads, fn, arg, 0); }

int parallel_run_helpers(int nthreads, team_fn fn, void *arg) { return run(nthreads, fn, arg, 1); }
