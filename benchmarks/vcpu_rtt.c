// Round trip of one cache line between a thread on vCPU 0 and one on vCPU 1, in ns: about 130 ns
// when the two vCPUs share a die's L3, about 350 ns across dies (docs/benchmarks.md).
//   cc -O2 -pthread -o vcpu_rtt benchmarks/vcpu_rtt.c && ./vcpu_rtt SECONDS
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Atomic long turn __attribute__((aligned(64)));
static atomic_int done;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// Answers each odd value with the next even one, until told to stop.
static void *answer(void *unused) {
    (void)unused;
    pin(1);
    for (long v = 1; !atomic_load(&done); v += 2) {
        while (atomic_load_explicit(&turn, memory_order_acquire) != v)
            if (atomic_load(&done)) return NULL;
        atomic_store_explicit(&turn, v + 1, memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 0.2;
    pthread_t other;
    pin(0);
    pthread_create(&other, NULL, answer, NULL);
    long trips = 0;
    double start = now();
    for (long v = 0; now() - start < seconds; v += 2, trips++) {
        atomic_store_explicit(&turn, v + 1, memory_order_release);
        while (atomic_load_explicit(&turn, memory_order_acquire) != v + 2) {
        }
    }
    double elapsed = now() - start;
    atomic_store(&done, 1);
    pthread_join(other, NULL);
    printf("%.0f\n", elapsed / trips * 1e9);
    return 0;
}
