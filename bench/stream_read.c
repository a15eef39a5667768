/* A STREAM-style read of a large buffer with every core: the machine's memory read bandwidth.
 *
 * Built and run by bench/bench_floor.py: cc -O3 -fopenmp stream_read.c -o stream_read
 * Usage: stream_read MEBIBYTES REPEATS  ->  prints the best GB/s (10^9 bytes a second) and the thread count.
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1024;
    int repeats = argc > 2 ? atoi(argv[2]) : 5;
    size_t count = mib * 1024 * 1024 / sizeof(uint64_t);
    uint64_t *data = aligned_alloc(64, count * sizeof(uint64_t));
    if (data == NULL) {
        fprintf(stderr, "stream_read: cannot allocate %zu MiB\n", mib);
        return 1;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++) data[i] = i; /* each thread touches the pages it will read */
    double best = 0;
    uint64_t check = 0;
    for (int r = 0; r < repeats; r++) {
        uint64_t sum = 0;
        double started = omp_get_wtime();
#pragma omp parallel for schedule(static) reduction(+ : sum)
        for (size_t i = 0; i < count; i++) sum += data[i];
        double seconds = omp_get_wtime() - started;
        double rate = count * sizeof(uint64_t) / seconds / 1e9;
        if (rate > best) best = rate;
        check += sum;
    }
    printf("%.2f %d %llu\n", best, omp_get_max_threads(), (unsigned long long)(check & 1));
    free(data);
    return 0;
}
